//! `cargo xtask demo`: the seed walkthrough on a fresh sandbox cluster. Every step prints
//! the command a user would type (with `KUBECONFIG` exported) and its real output; the
//! sandbox is torn down at the end, on failure and on Ctrl-C.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{
    Sandbox, UpArgs,
    image::{APP_IMAGE, CLIENT_IMAGE},
    wait_for,
};

/// The seed's application: a ReplicaSet of pods answering "You've hit <pod name>".
fn app_yaml() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: mynapp-rs
spec:
  replicas: 3
  selector:
    matchLabels: {{app: mynapp}}
  template:
    metadata:
      labels: {{app: mynapp}}
    spec:
      containers:
      - name: mynapp
        image: {APP_IMAGE}
        ports: [{{containerPort: 8080}}]
        readinessProbe:
          httpGet: {{path: /, port: 8080}}
          periodSeconds: 1
"#
    )
}

fn client_yaml() -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: client\nspec:\n  containers:\n  - {{name: client, image: {CLIENT_IMAGE}}}\n"
    )
}

pub fn run() -> Result<()> {
    super::require_root()?;
    super::install_teardown_on_signal();
    println!(
        "lb sandbox demo: a ReplicaSet behind a ClusterIP Service on two real nodes (kubelet, containerd), served by the lb DaemonSet\n"
    );
    let res = walkthrough();
    println!("\n== teardown ==\n$ cargo xtask sandbox down");
    let down = super::down(true);
    let mut rows = match res {
        Ok(rows) => rows,
        Err(e) => {
            down.ok();
            return Err(e.context("the demo failed (the sandbox has been torn down)"));
        }
    };
    rows.push((
        "teardown".into(),
        if down.is_ok() {
            "all lbsb-* namespaces, processes, mounts, cgroups and files removed".into()
        } else {
            "FAILED".into()
        },
    ));
    down?;
    println!("\n== summary ==");
    let w = rows.iter().map(|(s, _)| s.len()).max().unwrap_or(0);
    println!("| {:w$} | result |", "step");
    println!("|{}|--------|", "-".repeat(w + 2));
    for (s, r) in &rows {
        println!("| {s:w$} | {r} |");
    }
    Ok(())
}

fn section(n: usize, title: &str) {
    println!("\n== {n}. {title} ==");
}

fn show_cmd(cmd: &str) {
    println!("$ {cmd}");
}

fn walkthrough() -> Result<Vec<(String, String)>> {
    let mut rows = Vec::new();
    section(1, "bring up the sandbox cluster");
    show_cmd("cargo xtask sandbox up --nodes 2");
    let sb = super::up(&UpArgs::default())?;
    println!("$ export KUBECONFIG={}", sb.kubeconfig.display());
    print!("$ kubectl get nodes -o wide\n{}", sb.kubectl(&["get", "nodes", "-o", "wide"])?);
    print!(
        "$ kubectl -n kube-system get pods -o wide\n{}",
        sb.kubectl(&["-n", "kube-system", "get", "pods", "-o", "wide"])?
    );
    rows.push(("sandbox up".into(), "2 nodes Ready, lb-agent DaemonSet ready on each".into()));

    section(2, "ReplicaSet mynapp-rs (3 pods), exposed as Service mynapp-svc (ClusterIP, port 80 -> 8080)");
    show_cmd("kubectl apply -f mynapp.yaml");
    let app = app_yaml();
    for l in app.lines() {
        println!("    {l}");
    }
    print!("{}", sb.apply(&app)?);
    show_cmd("kubectl expose rs mynapp-rs --name=mynapp-svc --port=80 --target-port=8080");
    print!("{}", sb.kubectl(&["expose", "rs", "mynapp-rs", "--name=mynapp-svc", "--port=80", "--target-port=8080"])?);
    eprintln!("  (waiting for 3 ready endpoints...)");
    wait_endpoints(&sb, "mynapp-svc", 3)?;
    show_cmd("kubectl apply -f client.yaml   # a pod with a shell and curl, made after the Service");
    print!("{}", sb.apply(&client_yaml())?);
    wait_running(&sb, "client")?;
    print!("$ kubectl get pods -o wide\n{}", sb.kubectl(&["get", "pods", "-o", "wide"])?);

    section(3, "the Service and its endpoints");
    show_cmd("kubectl get svc,endpoints");
    print!("{}", sb.kubectl(&["get", "svc,endpoints"])?);
    let cip = sb.kubectl(&["get", "svc", "mynapp-svc", "-o", "jsonpath={.spec.clusterIP}"])?;
    rows.push(("3 replicas".into(), format!("mynapp-svc {cip}:80 -> 3 endpoints")));

    section(4, "10 requests from the client pod to the ClusterIP");
    let spread = requests(&sb, 10, true)?;
    rows.push(("10 requests".into(), spread_text(&spread, 10)));

    section(5, "scale to 5 replicas: the endpoints follow, and traffic reaches the new pods");
    show_cmd("kubectl scale rs mynapp-rs --replicas=5");
    print!("{}", sb.kubectl(&["scale", "rs", "mynapp-rs", "--replicas=5"])?);
    eprintln!("  (waiting for 5 ready endpoints...)");
    wait_endpoints(&sb, "mynapp-svc", 5)?;
    show_cmd("kubectl get endpoints mynapp-svc");
    print!("{}", sb.kubectl(&["get", "endpoints", "mynapp-svc"])?);
    let spread = requests(&sb, 30, false)?;
    rows.push(("scale to 5, 30 requests".into(), spread_text(&spread, 30)));

    section(6, "sessionAffinity: ClientIP -> every request from the client lands on one pod");
    let patch = r#"{"spec":{"sessionAffinity":"ClientIP"}}"#;
    show_cmd(&format!("kubectl patch svc mynapp-svc -p '{patch}'"));
    print!("{}", sb.kubectl(&["patch", "svc", "mynapp-svc", "-p", patch])?);
    // The agent programs a change within tens of milliseconds; give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    let spread = requests(&sb, 10, true)?;
    let one = spread.len() == 1;
    rows.push((
        "sessionAffinity ClientIP".into(),
        format!("{} ({})", spread_text(&spread, 10), if one { "one pod" } else { "NOT one pod" }),
    ));

    section(7, "service environment variables inside a pod");
    show_cmd("kubectl exec client -- env | grep ^MYNAPP_SVC_ | sort");
    let (_, env, _) = sb.exec("default", "client", &["env"])?;
    let mut lines: Vec<&str> = env.lines().filter(|l| l.starts_with("MYNAPP_SVC_")).collect();
    lines.sort_unstable();
    let out = lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    print!("{out}");
    let host_ok = out.contains(&format!("MYNAPP_SVC_SERVICE_HOST={cip}"));
    let port_ok = out.contains("MYNAPP_SVC_SERVICE_PORT=80");
    rows.push((
        "env vars".into(),
        if host_ok && port_ok {
            format!("MYNAPP_SVC_SERVICE_HOST={cip}, MYNAPP_SVC_SERVICE_PORT=80")
        } else {
            "MISSING".into()
        },
    ));

    // The client's node: its datapath did the NAT, so its counters show the traffic.
    let node = sb.kubectl(&["get", "pod", "client", "-o", "jsonpath={.spec.nodeName}"])?;
    let n: u8 = super::node_index(node.trim()).unwrap_or(1);
    section(8, "`lb services` on the client's node: the programmed frontends, backends and counters");
    show_cmd(&format!("kubectl -n kube-system exec {} -- lb services", sb.agent_pod(n)?));
    let svcs = sb.lb_on_node(n, &["services"])?;
    print!("{svcs}");
    rows.push((
        format!("lb services (node {n})"),
        format!(
            "{} backends listed",
            svcs.lines().filter(|l| l.trim_start().starts_with("->") && l.contains(":8080")).count()
        ),
    ));
    if !one || !host_ok || !port_ok {
        bail!("the demo's checks failed; see the summary above");
    }
    Ok(rows)
}

/// `n` requests `curl http://$MYNAPP_SVC_SERVICE_HOST/` from the client; answers per pod.
fn requests(sb: &Sandbox, n: usize, print_each: bool) -> Result<BTreeMap<String, usize>> {
    let cmd = "curl -s --max-time 3 http://$MYNAPP_SVC_SERVICE_HOST:$MYNAPP_SVC_SERVICE_PORT/";
    show_cmd(&format!("for i in $(seq {n}); do kubectl exec client -- sh -c '{cmd}'; done"));
    let mut spread = BTreeMap::new();
    for i in 0..n {
        let (code, out, err) = sb.exec("default", "client", &["sh", "-c", cmd])?;
        if code != 0 {
            bail!("request {} failed (curl exit {code}): {err}", i + 1);
        }
        if print_each {
            print!("{out}");
        }
        let pod = out.trim().trim_start_matches("You've hit ").to_owned();
        *spread.entry(pod).or_insert(0) += 1;
    }
    println!("answers per pod:");
    for (p, c) in &spread {
        println!("  {p:20} {c:3}  {}", "#".repeat(*c));
    }
    Ok(spread)
}

fn spread_text(s: &BTreeMap<String, usize>, n: usize) -> String {
    let counts: Vec<String> = s.values().map(usize::to_string).collect();
    format!("{}/{n} answered by {} pods ({})", s.values().sum::<usize>(), s.len(), counts.join("+"))
}

pub fn ready_endpoints(sb: &Sandbox, svc: &str) -> usize {
    sb.kubectl(&["get", "endpoints", svc, "-o", "json"])
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map(|v| {
            v["subsets"].as_array().into_iter().flatten().map(|s| s["addresses"].as_array().map_or(0, Vec::len)).sum()
        })
        .unwrap_or(0)
}

fn wait_endpoints(sb: &Sandbox, svc: &str, n: usize) -> Result<()> {
    wait_for(&format!("{n} ready endpoints of {svc}"), Duration::from_secs(60), || Ok(ready_endpoints(sb, svc) == n))
        .with_context(|| format!("pods: {}", sb.kubectl(&["get", "pods", "-o", "wide"]).unwrap_or_default()))
}

/// Waits until `pod` (namespace default) is Ready.
pub fn wait_running(sb: &Sandbox, pod: &str) -> Result<()> {
    wait_for(&format!("pod {pod} to be ready"), Duration::from_secs(90), || {
        let s = sb
            .kubectl(&["get", "pod", pod, "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"])
            .unwrap_or_default();
        Ok(s.trim() == "True")
    })
}
