//! The Envoy-mode contract of `deploy/envoy/internal-sidecar.yaml`, live but without Envoy (no
//! Envoy binary here): Gatehouse in `internal.mode = "envoy"` answers an exchange carrying the
//! `x-forwarded-client-cert` that sidecar writes (SANITIZE_SET, `uri: true`: one element with the
//! verified certificate's hash and URI SAN) for each principal its RBAC admits, and refuses
//! requests whose header the sidecar did not write. deploy/envoy/envoy_test.go checks the file's
//! structure with go-control-plane; this checks that Gatehouse agrees with it.

use serde_json::{Value, json};

use crate::harness::*;

fn sidecar() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/envoy/internal-sidecar.yaml");
    std::fs::read_to_string(path).expect("deploy/envoy/internal-sidecar.yaml")
}

/// The SPIFFE IDs in the sidecar's RBAC (`principal_name: {exact: "…"}` lines).
fn rbac_principals(yaml: &str) -> Vec<String> {
    yaml.lines()
        .filter_map(|l| l.split_once("principal_name: {exact: ")?.1.strip_suffix('}'))
        .map(|v| v.trim().trim_matches('"').to_string())
        .collect()
}

/// The XFCC element Envoy writes with SANITIZE_SET and `uri: true` (`By` only when Envoy's own
/// certificate has a URI SAN, which a cert-manager server certificate does not).
fn envoy_xfcc(spiffe_id: &str) -> String {
    let hash = gatehouse::crypto::hex(&gatehouse::crypto::sha256(spiffe_id.as_bytes()));
    format!("Hash={hash};URI={spiffe_id}")
}

#[tokio::test]
async fn envoy_mode_answers_what_the_internal_sidecar_forwards_and_nothing_else() {
    let yaml = sidecar();
    // The contract this test relies on, as written in the file.
    assert!(yaml.contains("forward_client_cert_details: SANITIZE_SET"));
    assert!(yaml.contains("set_current_client_cert_details:\n                  uri: true"));
    assert!(yaml.contains("socket_address: {address: 127.0.0.1, port_value: 8444}"), "upstream on loopback");
    let principals = rbac_principals(&yaml);
    assert!(!principals.is_empty(), "no RBAC principals found in the sidecar file");

    let work = Workdir::new();
    let o = Options {
        extra: format!("[internal]\nmode = \"envoy\"\nlisten = \"127.0.0.1:0\"\nallow = {principals:?}\n"),
        ..Options::default()
    };
    let gate = Gate::start(&work, &o).await;
    let sid = logged_in(&gate, "alice").await;
    let url = format!(
        "http://127.0.0.1:{}/internal/v1/session/exchange",
        gate.running.as_ref().unwrap().internal_addr.unwrap().port()
    );
    let send = |headers: Vec<String>| {
        let (url, sid) = (url.clone(), sid.clone());
        async move {
            let mut r = http().post(url).json(&json!({"session_id": sid}));
            for h in headers {
                r = r.header("x-forwarded-client-cert", h);
            }
            let resp = r.send().await.unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    for p in &principals {
        let (status, body) = send(vec![envoy_xfcc(p)]).await;
        assert_eq!(status, 200, "{p}: {body}");
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["claims"]["preferred_username"], "alice");
    }
    let p = &principals[0];
    // Not written by the sidecar (it always sets exactly one header line with the verified URI):
    let refused: [(&str, Vec<String>); 6] = [
        ("no header: the request did not come through the sidecar", vec![]),
        ("a caller the RBAC does not list", vec![envoy_xfcc("spiffe://cluster.local/ns/x/sa/intruder")]),
        ("no URI (uri: true missing)", vec![format!("Hash={}", "0".repeat(64))]),
        (
            "a client-sent header next to Envoy's",
            vec![format!("URI={p}"), envoy_xfcc("spiffe://cluster.local/ns/x/sa/y")],
        ),
        (
            "an unbalanced quote swallowing Envoy's element",
            vec![format!("URI=\"{p},{}", envoy_xfcc("spiffe://cluster.local/ns/x/sa/y"))],
        ),
        ("a lookalike of the allowed ID", vec![envoy_xfcc(&format!("{p}-x"))]),
    ];
    for (why, headers) in refused {
        let (status, body) = send(headers).await;
        assert_eq!(status, 403, "{why}: {body}");
        assert!(body.get("access_token").is_none(), "{why}");
    }
    gate.stop().await;
}
