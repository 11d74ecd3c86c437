//! The clients: `crr`, `rr`, `watch` and `probe`.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    mem,
    net::SocketAddr,
    process::ExitCode,
    sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use serde_json::{Value, json};

use crate::{
    proto::{self, MAX_NAME},
    stats::{self, Tally},
};

/// rr's reply timeout.
const RR_TIMEOUT: Duration = Duration::from_secs(1);
/// rr's connect timeout: over 3 s, so that the kernel's SYN retransmits at 1 s and 3 s
/// (TCP_TIMEOUT_INIT, doubling) fall inside one attempt instead of racing its end.
const RR_CONNECT_TIMEOUT: Duration = Duration::from_millis(3500);
/// watch's timeouts are short so that a request caught by the change fails fast and the
/// next one sees the new state.
const WATCH_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
const WATCH_READ_TIMEOUT: Duration = Duration::from_millis(500);
const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// Pause before retrying a failed request, so a refusing target isn't spun on.
const RETRY_PAUSE: Duration = Duration::from_millis(1);

pub fn crr(target: SocketAddr, clients: u32, duration: Duration, timeout: Duration) -> Result<ExitCode> {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tally = on_threads(clients, || {
        let mut tally = Tally::default();
        // The run's duration counts from the connection, not from a retried connect.
        let deadline = deadline.max(Instant::now() + duration);
        let mut buf = [0; MAX_NAME + 1];
        loop {
            let t0 = Instant::now();
            if t0 >= deadline {
                return tally;
            }
            match proto::request(target, timeout, timeout, &mut buf) {
                Ok((_, replied)) => tally.samples.push(micros(replied - t0)),
                Err(e) => tally.error(&e),
            }
        }
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let mut samples = mem::take(&mut tally.samples);
    samples.sort_unstable();
    let n = samples.len();
    let mut out = json!({
        "connections": n,
        "errors": tally.errors,
        "seconds": stats::round(seconds, 3),
        "cps": stats::round(n as f64 / seconds, 1),
    });
    finish(&mut out, stats::latency_fields(&samples, Value::from), tally.first_error())?;
    ensure!(n > 0, "no connection to {target} succeeded");
    Ok(ExitCode::SUCCESS)
}

pub fn rr(target: SocketAddr, connections: u32, duration: Duration) -> Result<ExitCode> {
    let start = Instant::now();
    let deadline = start + duration;
    // A lost SYN costs a connect timeout; rr measures the requests after it, so the
    // connect is tried up to three times (counted in `connect_retries`). Seen once right
    // after a `crr` run through kube-proxy, whose conntrack still held the RST-closed
    // flows of the reused source ports.
    let retries = std::sync::atomic::AtomicU32::new(0);
    let mut tally = on_threads(connections, || {
        let mut tally = Tally::default();
        let mut attempt = 0;
        let mut stream = loop {
            match proto::connect(target, RR_CONNECT_TIMEOUT, RR_TIMEOUT) {
                Ok(stream) => break stream,
                Err(_) if attempt < 2 => {
                    attempt += 1;
                    retries.fetch_add(1, Relaxed);
                }
                Err(e) => {
                    tally.error(&anyhow!(e).context(format!("connecting to {target}")));
                    return tally;
                }
            }
        };
        // As in crr, the run's duration counts from the connection: a connect retried
        // for 2 s of a 2 s run would otherwise leave no time for a single request.
        let deadline = deadline.max(Instant::now() + duration);
        let mut buf = [0; MAX_NAME + 1];
        loop {
            let t0 = Instant::now();
            if t0 >= deadline {
                return tally;
            }
            match proto::transact(&mut stream, &mut buf) {
                Ok(_) => tally.samples.push(t0.elapsed().as_nanos() as f64 / 1e3),
                Err(e) => {
                    tally.error(&anyhow!(e).context(format!("request to {target}")));
                    return tally;
                }
            }
        }
    })?;
    let seconds = start.elapsed().as_secs_f64();
    let mut samples = mem::take(&mut tally.samples);
    samples.sort_unstable_by(f64::total_cmp);
    let n = samples.len();
    let mut out = json!({
        "transactions": n,
        "seconds": stats::round(seconds, 3),
        "tps": stats::round(n as f64 / seconds, 1),
        "errors": tally.errors,
        "connect_retries": retries.load(Relaxed),
    });
    let latency = stats::latency_fields(&samples, |us| stats::round(us, 1).into());
    finish(&mut out, latency, tally.first_error())?;
    if let Some(e) = tally.first_error() {
        bail!("{} of {connections} connections failed; the first: {e}", tally.errors);
    }
    Ok(ExitCode::SUCCESS)
}

/// `parallel` threads of back-to-back requests, so that one request stalled across the
/// change (its SYN reached the old pod just as it went) cannot hide the first reply from
/// the new one behind its timeout.
pub fn watch(target: SocketAddr, want: &str, timeout: Duration, interval: Duration, parallel: u32) -> Result<ExitCode> {
    let deadline = Instant::now() + timeout;
    let want_failure = want == "-";
    // Set once `ready` was printed; `done` once `seen` was.
    let ready = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let tries = AtomicU64::new(0);
    let out = std::sync::Mutex::new(());
    let said = |line: &str| -> Result<()> {
        let _g = out.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        say(line)
    };
    let result: Result<()> = thread::scope(|s| {
        let threads: Vec<_> = (0..parallel.max(1))
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let mut buf = [0; MAX_NAME + 1];
                    while !done.load(Relaxed) && Instant::now() < deadline {
                        let was_ready = ready.load(Relaxed);
                        let started = unix_ns();
                        let res = proto::request(target, WATCH_CONNECT_TIMEOUT, WATCH_READ_TIMEOUT, &mut buf);
                        if was_ready {
                            tries.fetch_add(1, Relaxed);
                        }
                        match res {
                            Ok((len, _)) => {
                                let name = proto::name(&buf[..len]).into_owned();
                                if !ready.swap(true, Relaxed) {
                                    // The caller makes its change only after this line.
                                    said(&format!("ready {name}"))?;
                                }
                                // Only a request started after `ready` can show the change.
                                if was_ready && !want_failure && name == want && !done.swap(true, Relaxed) {
                                    said(&format!("seen {started} {}", tries.load(Relaxed)))?;
                                }
                                thread::sleep(interval);
                            }
                            Err(e) if was_ready && want_failure => {
                                if !done.swap(true, Relaxed) {
                                    eprintln!("lb-bench-tool: {e:#}");
                                    said(&format!("seen {started} {}", tries.load(Relaxed)))?;
                                }
                            }
                            Err(_) => thread::sleep(RETRY_PAUSE),
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        threads.into_iter().try_for_each(|t| t.join().map_err(|_| anyhow!("a watch thread panicked"))?)
    });
    result?;
    if done.load(Relaxed) {
        return Ok(ExitCode::SUCCESS);
    }
    say("timeout")?;
    Ok(ExitCode::from(2))
}

pub fn probe(targets_file: &str, timeout: Duration, parallel: u32) -> Result<ExitCode> {
    let text = if targets_file == "-" {
        let mut text = String::new();
        io::stdin().read_to_string(&mut text).context("reading the targets from stdin")?;
        text
    } else {
        fs::read_to_string(targets_file).with_context(|| format!("reading {targets_file}"))?
    };
    let source = if targets_file == "-" { "stdin" } else { targets_file };
    let targets = parse_targets(&text).with_context(|| format!("in {source}"))?;
    ensure!(!targets.is_empty(), "no targets in {source}");

    let start = Instant::now();
    let deadline = start + timeout;
    let answered: Vec<AtomicBool> = targets.iter().map(|_| AtomicBool::new(false)).collect();
    let remaining = AtomicUsize::new(targets.len());
    let last_answer_ns = AtomicU64::new(0);
    // Threads take targets round-robin, skipping answered ones, so every pending target
    // is retried about equally often however few remain.
    let cursor = AtomicUsize::new(0);
    thread::scope(|s| {
        for _ in 0..parallel {
            s.spawn(|| {
                let mut buf = [0; MAX_NAME + 1];
                while remaining.load(Relaxed) > 0 && Instant::now() < deadline {
                    let i = cursor.fetch_add(1, Relaxed) % targets.len();
                    if answered[i].load(Relaxed) {
                        continue;
                    }
                    match proto::request(targets[i], PROBE_TIMEOUT, PROBE_TIMEOUT, &mut buf) {
                        // Another thread may have had the same target in flight.
                        Ok(_) if !answered[i].swap(true, Relaxed) => {
                            last_answer_ns.fetch_max(unix_ns(), Relaxed);
                            remaining.fetch_sub(1, Relaxed);
                        }
                        Ok(_) => {}
                        Err(_) => thread::sleep(RETRY_PAUSE),
                    }
                }
            });
        }
    });
    let missing = remaining.load(Relaxed);
    let out = json!({
        "targets": targets.len(),
        "answered": targets.len() - missing,
        "all_answered_unix_ns": (missing == 0).then(|| last_answer_ns.load(Relaxed)),
        "seconds": stats::round(start.elapsed().as_secs_f64(), 3),
    });
    say(&out.to_string())?;
    Ok(if missing == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) })
}

/// One `IP:PORT` per line; blank lines and `#` comments are skipped.
fn parse_targets(text: &str) -> Result<Vec<SocketAddr>> {
    text.lines()
        .enumerate()
        .map(|(i, line)| (i + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(n, line)| line.parse().with_context(|| format!("line {n}: {line:?} is not IP:PORT")))
        .collect()
}

/// Runs `f` on `n` threads and merges their tallies.
fn on_threads<T: Send>(n: u32, f: impl Fn() -> Tally<T> + Sync) -> Result<Tally<T>> {
    thread::scope(|s| {
        let threads: Vec<_> = (0..n).map(|_| s.spawn(&f)).collect();
        threads.into_iter().try_fold(Tally::default(), |all, t| {
            Ok(all.merge(t.join().map_err(|_| anyhow!("a client thread panicked"))?))
        })
    })
}

/// Adds the latency fields and the first error, if any, and prints the object.
fn finish(out: &mut Value, latency: serde_json::Map<String, Value>, first_error: Option<&str>) -> Result<()> {
    if let Value::Object(obj) = out {
        obj.extend(latency);
        if let Some(e) = first_error {
            obj.insert("first_error".into(), e.into());
        }
    }
    say(&out.to_string())
}

/// Prints a line and flushes it at once: callers act on each line as it arrives.
fn say(line: &str) -> Result<()> {
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}").and_then(|()| stdout.flush()).context("writing to stdout")
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Wall-clock time, comparable with the caller's timestamps of its change.
fn unix_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_file() {
        let text = "# ClusterIPs\n10.96.0.10:80\n\n  10.96.0.11:8080  \n[fd00::1]:80\n";
        let want: Vec<SocketAddr> =
            ["10.96.0.10:80", "10.96.0.11:8080", "[fd00::1]:80"].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(parse_targets(text).unwrap(), want);
        let err = parse_targets("10.0.0.1:80\n10.0.0.2\n").unwrap_err();
        assert_eq!(err.to_string(), "line 2: \"10.0.0.2\" is not IP:PORT");
    }
}
