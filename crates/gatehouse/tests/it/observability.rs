//! Metrics an operator can trust: a live `/metrics` after real traffic passes `promtool check
//! metrics`, carries the RED, exchange, store, provider, certificate and build series with
//! bounded labels only, and every metric name the alerting rules (`deploy/prometheus/`) and the
//! dashboard (`deploy/grafana/`) use exists in it. The rules' own unit tests run here too.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use gatehouse::pki::San;
use serde_json::json;

use crate::harness::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn promtool() -> &'static str {
    let ok = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(ok, "promtool not found: run scripts/setup.sh (Debian package `prometheus`)");
    "promtool"
}

/// `promtool ARGS` with `stdin`; (success, stdout + stderr).
fn run_promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(promtool())
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

async fn scrape(gate: &Gate) -> String {
    http().get(format!("{}/metrics", gate.admin)).send().await.unwrap().text().await.unwrap()
}

/// A Gatehouse with the internal listener and an https proxy route (so every certificate kind
/// is loaded), after a login, `/auth/me`, an exchange, a 404 and a refused exchange.
async fn gate_with_traffic(work: &Workdir) -> (Gate, String) {
    let pki = work.pki();
    let extra = format!(
        "[[routes]]\nprefix = \"/api/tls/\"\nupstream = \"https://127.0.0.1:9/\"\nrelay = \"bearer\"\n\
         ca_file = \"{ca}\"\nclient_cert_file = \"{cert}\"\nclient_key_file = \"{key}\"\n",
        ca = pki.join("ca.crt").display(),
        cert = pki.join("gatehouse.crt").display(),
        key = pki.join("gatehouse.key").display(),
    );
    let gate = Gate::start(work, &Options { extra, ..Options::with_internal(&[POCKETBASE]) }).await;
    let sid = logged_in(&gate, "alice").await;
    let c = http();
    let me = c.get(format!("{}/auth/me", gate.base)).header("cookie", format!("{COOKIE}={sid}")).send().await.unwrap();
    assert_eq!(me.status(), 200);
    assert_eq!(c.get(format!("{}/no/such/page", gate.base)).send().await.unwrap().status(), 404);
    let ca = work.ca();
    let mtls = mtls_client(&ca.cert_pem, Some(&client_cert(&ca, vec![San::Uri(POCKETBASE.into())])));
    let url = format!("{}/internal/v1/session/exchange", gate.internal());
    assert_eq!(mtls.post(&url).json(&json!({"session_id": sid})).send().await.unwrap().status(), 200);
    assert_eq!(mtls.post(&url).json(&json!({"session_id": "A".repeat(43)})).send().await.unwrap().status(), 401);
    (gate, sid)
}

#[tokio::test]
async fn live_metrics_pass_promtool_and_carry_every_family_with_bounded_labels() {
    let work = Workdir::new();
    let (gate, sid) = gate_with_traffic(&work).await;
    let text = scrape(&gate).await;

    let (ok, out) = run_promtool(&["check", "metrics"], Some(&text));
    assert!(ok && out.trim().is_empty(), "promtool check metrics: {out}\n---\n{text}");
    // Prometheus asks for OpenMetrics and gets it.
    let om = http()
        .get(format!("{}/metrics", gate.admin))
        .header("accept", "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
        .send()
        .await
        .unwrap();
    assert!(om.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let om = om.text().await.unwrap();
    assert!(om.ends_with("# EOF\n") && om.contains("# TYPE gatehouse_logins counter"), "{om}");

    for series in [
        // RED per face and route template, by status class.
        r#"gatehouse_http_requests_total{face="public",route="/auth/me",method="GET",status_class="2xx"} 1"#,
        r#"gatehouse_http_requests_total{face="public",route="/auth/login",method="POST",status_class="2xx"} 1"#,
        r#"gatehouse_http_requests_total{face="public",route="other",method="GET",status_class="4xx"} 1"#,
        r#"gatehouse_http_requests_total{face="internal",route="/internal/v1/session/exchange",method="POST",status_class="2xx"} 1"#,
        r#"gatehouse_http_requests_total{face="internal",route="/internal/v1/session/exchange",method="POST",status_class="4xx"} 1"#,
        r#"gatehouse_http_request_duration_seconds_count{face="public",route="/auth/me"} 1"#,
        // Exchanges by outcome and (allow-listed) caller.
        r#"gatehouse_exchanges_total{outcome="ok",caller="spiffe://gatehouse.local/ns/data/sa/pocketbase"} 1"#,
        r#"gatehouse_exchanges_total{outcome="invalid_session",caller="spiffe://gatehouse.local/ns/data/sa/pocketbase"} 1"#,
        // Every refresh outcome exists from the start (ratios over them are never "no data").
        r#"gatehouse_token_refreshes_total{outcome="invalid_grant"} 0"#,
        r#"gatehouse_logins_total{outcome="ok"} 1"#,
        r#"gatehouse_identity_provider_request_duration_seconds_count{endpoint="token",outcome="ok"} 1"#,
        r#"gatehouse_build_info{version=""#,
    ] {
        assert!(text.contains(series), "missing {series}\n---\n{text}");
    }
    for prefix in [
        r#"gatehouse_identity_provider_request_duration_seconds_count{endpoint="discovery",outcome="ok"}"#,
        r#"gatehouse_identity_provider_request_duration_seconds_count{endpoint="jwks",outcome="ok"}"#,
        r#"gatehouse_session_store_operation_duration_seconds_count{operation="insert"}"#,
        r#"gatehouse_session_store_operation_duration_seconds_count{operation="get"}"#,
        "gatehouse_sessions_active ",
        r#"gatehouse_certificate_expiry_timestamp_seconds{certificate="internal_server",route="-"}"#,
        r#"gatehouse_certificate_expiry_timestamp_seconds{certificate="internal_client_ca",route="-"}"#,
        r#"gatehouse_certificate_expiry_timestamp_seconds{certificate="route_ca",route="/api/tls/"}"#,
        r#"gatehouse_certificate_expiry_timestamp_seconds{certificate="route_client",route="/api/tls/"}"#,
    ] {
        assert!(text.lines().any(|l| l.starts_with(prefix)), "missing {prefix}\n---\n{text}");
    }
    // The certificate gauges hold the real not-after of the files.
    let want = gatehouse::metrics::earliest_not_after(&work.pki().join("gatehouse.crt")).unwrap();
    assert!(text.contains(&format!(
        r#"gatehouse_certificate_expiry_timestamp_seconds{{certificate="internal_server",route="-"}} {want}"#
    )));

    // Labels are enums or configuration, never a user, a session or a raw path.
    let (record, _) = session_tokens(&gate, &sid).await;
    let key = gatehouse::session::SessionId::parse(&sid).unwrap().key();
    for secret in [sid.as_str(), &key.prefix(), &record.claims.sub, "alice", "/no/such/page"] {
        assert!(!text.contains(secret), "/metrics contains {secret}");
    }
    gate.stop().await;
}

/// Metric names a PromQL expression uses: identifiers followed by `{`, `[`, `)` or whitespace,
/// minus PromQL's own words and label names.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    let mut in_braces = 0i32;
    let mut in_string = false;
    while i < bytes.len() {
        let c = bytes[i] as char;
        if in_string {
            if c == '"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match c {
            '"' => in_string = true,
            '{' => in_braces += 1,
            '}' => in_braces -= 1,
            _ => {}
        }
        if in_braces == 0 && (c.is_ascii_alphabetic() || c == '_' || c == ':') {
            let start = i;
            while i < bytes.len()
                && ((bytes[i] as char).is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':')
            {
                i += 1;
            }
            let word = &expr[start..i];
            // A function call or a keyword's argument list follows with `(`; `by (...)` lists labels.
            let next = expr[i..].trim_start().chars().next();
            let prev = expr[..start].trim_end();
            let in_grouping = prev.ends_with('(') && {
                let before = prev[..prev.len() - 1].trim_end();
                ["by", "without", "on", "ignoring", "group_left", "group_right"].iter().any(|k| before.ends_with(k))
            } || prev.ends_with(',') && grouping_open(&expr[..start]);
            if word.starts_with("gatehouse_") && next != Some('(') && !in_grouping {
                names.insert(word.to_string());
            }
            continue;
        }
        i += 1;
    }
    names
}

/// Whether the innermost open parenthesis before this point belongs to `by`/`without`/….
fn grouping_open(before: &str) -> bool {
    let mut depth = 0;
    for (i, c) in before.char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' if depth == 0 => {
                let head = before[..i].trim_end();
                return ["by", "without", "on", "ignoring", "group_left", "group_right"]
                    .iter()
                    .any(|k| head.ends_with(k));
            }
            '(' => depth -= 1,
            _ => {}
        }
    }
    false
}

/// Every sample name `/metrics` can produce: from `# TYPE` lines (so families without samples
/// yet count) plus each type's suffixes.
fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_sum", "_count", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        for s in suffixes {
            names.insert(format!("{name}{s}"));
        }
    }
    names
}

fn rule_expressions() -> Vec<String> {
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/gatehouse-alerts.yml")).unwrap();
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().trim_matches('\'').to_string())
        .collect()
}

fn dashboard_expressions() -> Vec<String> {
    let text = std::fs::read_to_string(repo().join("deploy/grafana/gatehouse-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                for key in ["expr", "definition"] {
                    if let Some(serde_json::Value::String(e)) = m.get(key) {
                        out.push(e.clone());
                    }
                }
                m.values().for_each(|v| walk(v, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash, &mut out);
    out
}

#[test]
fn the_name_extractor_finds_metrics_not_functions_or_labels() {
    let names = promql_metric_names(
        r#"sum by (face, route) (rate(gatehouse_http_requests_total{status_class="5xx"}[5m])) / ignoring (x) gatehouse_build_info"#,
    );
    assert_eq!(names, BTreeSet::from(["gatehouse_http_requests_total".into(), "gatehouse_build_info".into()]));
}

#[tokio::test]
async fn alert_rules_pass_promtool_their_unit_tests_and_use_only_live_metric_names() {
    let (ok, out) = run_promtool(&["check", "rules", "deploy/prometheus/gatehouse-alerts.yml"], None);
    assert!(ok, "promtool check rules: {out}");
    let (ok, out) = run_promtool(&["test", "rules", "deploy/prometheus/gatehouse-alerts.test.yml"], None);
    assert!(ok, "promtool test rules: {out}");

    // Families are listed once they have a series: traffic as in the test above, and the zero
    // series Gatehouse creates from its configuration (routes, allowed callers, limits).
    let work = Workdir::new();
    let (gate, _) = gate_with_traffic(&work).await;
    let openmetrics = http()
        .get(format!("{}/metrics", gate.admin))
        .header("accept", "application/openmetrics-text")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exposed = exposed_names(&openmetrics);
    gate.stop().await;

    let rules = rule_expressions();
    let dashboard = dashboard_expressions();
    assert!(rules.len() >= 6, "the alert file has its rules: {rules:?}");
    assert!(rules.iter().all(|e| e.contains("gatehouse_")), "every expr is on its `expr:` line: {rules:?}");
    assert!(dashboard.len() >= 8, "the dashboard has its panels: {dashboard:?}");
    let mut used = BTreeSet::new();
    for e in rules.iter().chain(&dashboard) {
        used.extend(promql_metric_names(e));
    }
    assert!(used.len() >= 8, "{used:?}");
    let missing: Vec<_> = used.difference(&exposed).collect();
    assert!(
        missing.is_empty(),
        "rules/dashboard use metrics /metrics does not have: {missing:?}\nexposed: {exposed:?}"
    );
}
