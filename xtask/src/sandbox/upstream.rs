//! `cargo xtask test upstream`: Kubernetes' own Service e2e tests (`e2e.test` 1.20.2, built
//! from the same tree, unmodified) against the sandbox with one service proxy on every node.
//!
//! By default it runs the tests listed in [`EXPECTED`] (those that exercise ClusterIP
//! behaviour and must pass on lb; docs/conformance.md says why the others are out of scope)
//! and fails if one of them fails. `--all` runs the whole `[sig-network] Services` focus and
//! writes every result to `target/upstream-<proxy>.json`, which docs/conformance.md reports.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use super::{Proxy, UpArgs};
use crate::kube;

/// The focus of the issue: every Service test of 1.20.
pub const FOCUS: &str = r"\[sig-network\] Services";
/// What every test of [`FOCUS`] is named with.
const FOCUS_PREFIX: &str = "[sig-network] Services ";
/// Not run with `--all`: the ten `[Slow]` tests all need a cloud load balancer (type
/// LoadBalancer), which the skeleton provider never provides; each would wait 20 minutes
/// for one. They are reported as not run (docs/conformance.md: out of scope).
pub const SKIP: &str = r"\[Slow\]";

/// The tests that must pass on lb (docs/conformance.md), by their full ginkgo name.
pub const EXPECTED: &str = include_str!("upstream-expected.txt");

pub struct Outcome {
    pub name: String,
    /// "passed", "failed" or "skipped".
    pub result: String,
    pub seconds: f64,
    pub message: String,
}

pub fn run(proxy: Proxy, all: bool) -> Result<()> {
    super::require_root()?;
    super::install_teardown_on_signal();
    let expected: Vec<&str> =
        EXPECTED.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    let focus = if all {
        FOCUS.to_string()
    } else {
        // Exact names, as one alternation (ginkgo matches the regexp against the full name).
        expected.iter().map(|n| regex_escape(n)).collect::<Vec<_>>().join("|")
    };
    eprintln!("upstream: bringing up the sandbox (2 nodes, proxy {proxy:?})");
    let sb = match super::up(&UpArgs { proxy, ..UpArgs::default() }) {
        Ok(sb) => sb,
        Err(e) => {
            let _ = super::down(false);
            return Err(e);
        }
    };
    let res = run_e2e(&sb, &focus, all.then_some(SKIP));
    let down = super::down(false);
    let outcomes = res?;
    down?;
    // (name, first line of the failure)
    let mut failed: Vec<(String, String)> = vec![];
    let mut passed = 0;
    for o in &outcomes {
        println!("[{:^7}] {} ({:.0}s)", o.result, o.name, o.seconds);
        match o.result.as_str() {
            "passed" => passed += 1,
            "failed" => failed.push((o.name.clone(), o.message.lines().next().unwrap_or("").to_owned())),
            _ => {}
        }
    }
    if all {
        let out = super::target_dir()?.join(format!("upstream-{}.json", proxy.name()));
        let v: Vec<serde_json::Value> = outcomes
            .iter()
            .map(
                |o| serde_json::json!({"name": o.name, "result": o.result, "seconds": o.seconds, "message": o.message}),
            )
            .collect();
        fs::write(&out, serde_json::to_string_pretty(&v)?)?;
        eprintln!("results written to {}", out.display());
    } else {
        // Each expected test must have run: a name that no longer matches is a failure too.
        for n in &expected {
            if !outcomes.iter().any(|o| o.name.ends_with(n) || o.name == *n) {
                println!("[ MISSING ] {n} (did not run)");
                failed.push((n.to_string(), "did not run".into()));
            }
        }
    }
    println!("\n{passed} passed, {} failed", failed.len());
    for (name, why) in &failed {
        println!("  failed: {name} -- {why}");
    }
    if !all && !failed.is_empty() {
        bail!("{} expected-pass upstream tests failed", failed.len());
    }
    Ok(())
}

fn regex_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn run_e2e(sb: &super::Sandbox, focus: &str, skip: Option<&str>) -> Result<Vec<Outcome>> {
    let bins = kube::cached().context("kube binaries missing; try `cargo xtask kube build`")?;
    let report = sb.dir.join("e2e-report");
    fs::create_dir_all(&report)?;
    let log = sb.dir.join("e2e.log");
    let t0 = Instant::now();
    eprintln!("upstream: e2e.test --ginkgo.focus=<{} chars>; log {}", focus.len(), log.display());
    let mut cmd = Command::new(&bins.e2e_test);
    if let Some(skip) = skip {
        cmd.arg(format!("--ginkgo.skip={skip}"));
    }
    let st = cmd
        .arg(format!("--kubeconfig={}", sb.kubeconfig.display()))
        .arg("--provider=skeleton")
        .arg(format!("--num-nodes={}", sb.nodes))
        .arg(format!("--report-dir={}", report.display()))
        .arg(format!("--ginkgo.focus={focus}"))
        .arg("--ginkgo.noColor")
        // The framework looks for kubectl on PATH for some steps; use the cached one.
        .arg(format!("--kubectl-path={}", bins.kubectl.display()))
        .arg("-test.timeout=90m")
        .env("KUBECONFIG", &sb.kubeconfig)
        .env("PATH", path_with(&bins.dir))
        .stdin(Stdio::null())
        .stdout(fs::File::create(&log)?)
        .stderr(fs::File::options().append(true).open(&log)?)
        .status()
        .context("running e2e.test")?;
    eprintln!("upstream: e2e.test exited {st} after {:.0?}", t0.elapsed());
    let outcomes = parse_junit(&report)?;
    if outcomes.is_empty() {
        bail!("e2e.test ran no test ({st}); see {}\n{}", log.display(), super::tail(&log, 30));
    }
    Ok(outcomes)
}

fn path_with(dir: &Path) -> String {
    format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default())
}

/// The test cases of every junit_*.xml in `dir` (ginkgo v1's reporter).
fn parse_junit(dir: &Path) -> Result<Vec<Outcome>> {
    let mut files: Vec<PathBuf> =
        fs::read_dir(dir)?.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "xml")).collect();
    files.sort();
    let mut out = vec![];
    for f in files {
        let text = fs::read_to_string(&f)?;
        out.extend(parse_junit_text(&text).with_context(|| format!("parsing {}", f.display()))?);
    }
    Ok(out)
}

fn parse_junit_text(text: &str) -> Result<Vec<Outcome>> {
    use quick_xml::events::Event;
    let mut r = quick_xml::Reader::from_str(text);
    let mut out: Vec<Outcome> = vec![];
    let mut in_case = false;
    let mut in_failure = false;
    loop {
        match r.read_event()? {
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"testcase" => {
                let mut o =
                    Outcome { name: String::new(), result: "passed".into(), seconds: 0.0, message: String::new() };
                for a in e.attributes().flatten() {
                    let v = a.unescape_value()?.into_owned();
                    match a.key.as_ref() {
                        b"name" => o.name = v,
                        b"time" => o.seconds = v.parse().unwrap_or(0.0),
                        _ => {}
                    }
                }
                out.push(o);
                in_case = true;
            }
            Event::Start(e) | Event::Empty(e) if in_case && e.name().as_ref() == b"skipped" => {
                if let Some(o) = out.last_mut() {
                    o.result = "skipped".into();
                }
            }
            Event::Start(e) | Event::Empty(e) if in_case && matches!(e.name().as_ref(), b"failure" | b"error") => {
                if let Some(o) = out.last_mut() {
                    o.result = "failed".into();
                    for a in e.attributes().flatten() {
                        if a.key.as_ref() == b"message" {
                            o.message = a.unescape_value()?.into_owned();
                        }
                    }
                }
                in_failure = true;
            }
            Event::Text(t) if in_failure => {
                if let Some(o) = out.last_mut() {
                    o.message.push_str(&t.unescape()?);
                }
            }
            Event::CData(t) if in_failure => {
                if let Some(o) = out.last_mut() {
                    o.message.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::End(e) if matches!(e.name().as_ref(), b"failure" | b"error") => in_failure = false,
            Event::End(e) if e.name().as_ref() == b"testcase" => {
                in_case = false;
                in_failure = false;
            }
            Event::Eof => break,
            _ => {}
        }
    }
    // Ginkgo v1 reports every spec of the binary (those outside the focus as skipped) and
    // the suite's BeforeSuite/AfterSuite: keep the Service tests.
    out.retain(|o| o.name.starts_with(FOCUS_PREFIX));
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn junit_cases() {
        let x = r#"<?xml version="1.0"?><testsuite tests="3">
<testcase name="[sig-network] Services should a" classname="Kubernetes e2e suite" time="12.5"></testcase>
<testcase name="[sig-network] Services should b" classname="Kubernetes e2e suite" time="1"><failure type="Failure">x.go:1 boom&#xA;long &amp; text</failure><system-out>log</system-out></testcase>
<testcase name="[sig-network] Services should c" classname="Kubernetes e2e suite" time="0"><skipped></skipped></testcase>
<testcase name="[BeforeSuite] BeforeSuite" time="0"></testcase>
<testcase name="[sig-storage] Secrets should x" time="0"><skipped></skipped></testcase></testsuite>"#;
        let o = super::parse_junit_text(x).unwrap();
        assert_eq!(o.len(), 3);
        assert_eq!((o[0].result.as_str(), o[0].seconds), ("passed", 12.5));
        assert_eq!(o[1].result, "failed");
        assert!(o[1].message.starts_with("x.go:1 boom\nlong & text"), "{}", o[1].message);
        assert!(!o[1].message.contains("log"), "{}", o[1].message);
        assert_eq!(o[2].result, "skipped");
    }

    #[test]
    fn escapes_regex() {
        assert_eq!(super::regex_escape("[sig-network] a.b (x)"), r"\[sig-network\] a\.b \(x\)");
    }
}
