//! The configuration's tests: defaults, every refusal naming its key, messages, secrets.

use super::*;
use figment::Jail;

const MINIMAL: &str = r#"
    [public]
    external_url = "http://localhost:8080"
    [oidc]
    issuer = "http://127.0.0.1:8180/realms/gatehouse"
    client_id = "gatehouse"
    client_secret = "s3cret"
    [session]
    encryption_key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
"#;

fn load(jail: &mut Jail, text: &str) -> Result<Config, ConfigError> {
    jail.create_file("g.toml", text).map_err(|e| ConfigError::Parse(e.to_string()))?;
    Config::load(Path::new("g.toml"))
}

/// Messages a person can act on: the key as written in the file (no `default.` prefix), the
/// closest valid key, an example of the right form, the environment variable behind a clash.
#[test]
fn messages_name_the_key_suggest_the_fix_and_show_the_right_form() {
    Jail::expect_with(|jail| {
        fn err(jail: &mut Jail, text: &str) -> String {
            load(jail, text).err().map(|e| e.to_string()).unwrap_or_default()
        }
        let e = err(jail, &MINIMAL.replace("encryption_key = ", "encryption_keyfile = \"k\"\nencryption_key = "));
        assert!(
            e.contains("unknown key `session.encryption_keyfile`; did you mean `session.encryption_key_file`?"),
            "{e}"
        );
        assert!(!e.contains("default."), "no internal prefix: {e}");
        let e = err(jail, &format!("{MINIMAL}\n[admin]\nlisten = 9090"));
        assert!(e.contains("`admin.listen`") && e.contains("for example: listen = \"0.0.0.0:9090\""), "{e}");
        let e = err(jail, &MINIMAL.replace("client_secret = \"s3cret\"", "client_secret = 918273645"));
        assert!(e.contains("`oidc.client_secret`") && !e.contains("918273645"), "no secret echoed: {e}");
        let e = err(
            jail,
            &format!(
                "{MINIMAL}\n[[routes]]\nprefix = \"/api/a/\"\nupstream = \"https://svc:hunter2pw@api.example/\"\nrelay = \"bearer\"\n"
            ),
        );
        assert!(e.contains("https://api.example/") && !e.contains("hunter2pw"), "no password from a URL: {e}");
        let e = err(jail, &format!("{MINIMAL}\n[log]\nformat = \"jsno\""));
        assert!(e.contains("did you mean `json`?"), "{e}");
        for (level, hint) in
            [("verbose", "`debug`"), ("warning", "`warn`"), ("gatehouse=loud", "does not name a level")]
        {
            let e = err(jail, &format!("{MINIMAL}\n[log]\nlevel = \"{level}\""));
            assert!(e.contains("log.level") && e.contains(hint), "{level}: {e}");
        }
        assert!(load(jail, &format!("{MINIMAL}\n[log]\nlevel = \"gatehouse=debug,tower_http=warn,info\"")).is_ok());
        jail.create_file("key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")?;
        jail.set_env("GATEHOUSE_SESSION__ENCRYPTION_KEY", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=");
        let e = err(
            jail,
            &MINIMAL.replace(
                "encryption_key = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"",
                "encryption_key_file = \"key\"",
            ),
        );
        assert!(e.contains("GATEHOUSE_SESSION__ENCRYPTION_KEY") && e.contains("session.encryption_key_file"), "{e}");
        Ok(())
    });
}

/// The keys a section accepts, asked of the deserializer itself: an unknown key's error lists
/// every valid one.
fn accepted_keys(section: Option<&str>) -> Vec<String> {
    // Tables and arrays of tables (`[[routes]]`, `[[views]]` with `[[views.parts]]`) alike.
    let texts = match section {
        None => vec!["__probe = 1\n".to_string()],
        Some("views.parts") => vec!["[[views]]\n[[views.parts]]\n__probe = 1\n".to_string()],
        Some(s) => vec![format!("[{s}]\n__probe = 1\n"), format!("[[{s}]]\n__probe = 1\n")],
    };
    for text in texts {
        let Err(errors) = Figment::new().merge(Toml::string(&text)).extract::<Config>() else { continue };
        for e in errors {
            if let figment::error::Kind::UnknownField(field, expected) = &e.kind
                && field == "__probe"
            {
                return expected.iter().map(|k| k.to_string()).collect();
            }
        }
    }
    panic!("no unknown-field error for {section:?}");
}

/// docs/configuration.md and the accepted keys agree: no key missing from the docs, none
/// documented that the configuration does not know.
#[test]
fn the_configuration_reference_documents_exactly_the_accepted_keys() {
    // The reference is docs/configuration.md; composed views have theirs in docs/views.md.
    let doc = ["configuration.md", "views.md"]
        .iter()
        .map(|f| std::fs::read_to_string(format!("{}/../../docs/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap())
        .collect::<Vec<_>>()
        .join("\n## (next document)\n");
    let mut documented: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> = Default::default();
    let mut current: Option<String> = None;
    // Only the tables whose first column is `key` list keys (others list headers, answers…).
    let mut key_table = false;
    for line in doc.lines() {
        if let Some(rest) = line.strip_prefix("## `[").or_else(|| line.strip_prefix("### `[")) {
            current = Some(rest.trim_start_matches('[').split(']').next().unwrap_or_default().to_string());
            continue;
        }
        if line.starts_with("## ") || line.starts_with("### ") {
            current = None;
            continue;
        }
        if !line.starts_with('|') {
            key_table = false;
            continue;
        }
        if line.starts_with("| key |") {
            key_table = true;
            continue;
        }
        if !key_table {
            continue;
        }
        if let (Some(section), Some(cell)) = (&current, line.strip_prefix("| `")) {
            let first = cell.split(" |").next().unwrap_or_default();
            for key in first.split('`').step_by(2).map(|k| k.trim_matches(|c: char| c == ',' || c == ' ')) {
                if !key.is_empty() && !key.starts_with('"') && !key.contains(' ') {
                    documented.entry(section.clone()).or_default().insert(key.to_string());
                }
            }
        }
    }
    let mut sections = accepted_keys(None);
    if sections.iter().any(|s| s == "views") {
        sections.push("views.parts".into());
    }
    for section in &sections {
        let accepted: std::collections::BTreeSet<String> = accepted_keys(Some(section)).into_iter().collect();
        let in_doc = documented.get(section).cloned().unwrap_or_default();
        let missing: Vec<_> = accepted.difference(&in_doc).collect();
        let unknown: Vec<_> = in_doc.difference(&accepted).collect();
        assert!(missing.is_empty(), "[{section}] keys missing from docs/configuration.md: {missing:?}");
        assert!(unknown.is_empty(), "[{section}] keys documented but not accepted: {unknown:?}");
    }
    let documented_sections: Vec<_> = documented.keys().filter(|s| !sections.contains(s)).collect();
    assert!(
        documented_sections.is_empty(),
        "documented sections the configuration does not have: {documented_sections:?}"
    );
}

#[test]
fn tracing_is_off_by_default_and_its_keys_are_checked() {
    Jail::expect_with(|jail| {
        let c = load(jail, MINIMAL).expect("valid");
        assert!(c.tracing.endpoint.is_none());
        assert_eq!(c.tracing.propagation, TracePropagation::TrustedProxies);
        assert_eq!(c.tracing.sample_ratio, 1.0);
        let on = format!(
            "{MINIMAL}\n[tracing]\nendpoint = \"http://127.0.0.1:4318/v1/traces\"\nsample_ratio = 0.25\npropagation = \"never\"\n"
        );
        let c = load(jail, &on).expect("valid");
        assert_eq!(c.tracing.sample_ratio, 0.25);
        assert_eq!(c.tracing.propagation, TracePropagation::Never);
        jail.set_env("GATEHOUSE_TRACING__PROPAGATION", "any");
        assert_eq!(load(jail, &on).expect("valid").tracing.propagation, TracePropagation::Any);
        for (bad, key) in [
            ("sample_ratio = 1.5", "tracing.sample_ratio"),
            ("endpoint = \"grpc://collector:4317\"", "tracing.endpoint"),
            ("service_name = \" \"", "tracing.service_name"),
        ] {
            let text = format!("{MINIMAL}\n[tracing]\n{bad}\n");
            let err = load(jail, &text).expect_err(bad).to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
        let unknown = format!("{MINIMAL}\n[tracing]\nendpont = \"http://x\"\n");
        assert!(load(jail, &unknown).is_err(), "unknown keys are refused");
        Ok(())
    });
}

#[test]
fn minimal_config_gets_defaults() {
    Jail::expect_with(|jail| {
        let c = load(jail, MINIMAL).expect("valid");
        assert_eq!(c.session.idle_timeout, Duration::from_secs(1800));
        assert_eq!(c.session.absolute_timeout, Duration::from_secs(43200));
        assert_eq!(c.cookie().name, "__Host-Http-gatehouse");
        assert!(c.cookie().secure);
        assert!(!c.oidc.password_login);
        Ok(())
    });
}

#[test]
fn session_file_damage_keys() {
    Jail::expect_with(|jail| {
        let c = load(jail, MINIMAL).expect("valid");
        assert!(c.session.integrity_check);
        assert_eq!(c.session.integrity_check_timeout, Duration::from_secs(60));
        assert_eq!(c.session.on_corrupt, OnCorrupt::Fail);
        let c = load(
            jail,
            &format!(
                "{MINIMAL}\non_corrupt = \"move_aside\"\nintegrity_check = false\nintegrity_check_timeout = \"5m\""
            ),
        )
        .expect("valid");
        assert_eq!(c.session.on_corrupt, OnCorrupt::MoveAside);
        assert!(!c.session.integrity_check);
        assert_eq!(c.session.integrity_check_timeout, Duration::from_secs(300));
        let err = load(jail, &format!("{MINIMAL}\non_corrupt = \"ignore\"")).unwrap_err().to_string();
        assert!(err.contains("on_corrupt"), "{err}");
        let err = load(jail, &format!("{MINIMAL}\nintegrity_check_timeout = \"0s\"")).unwrap_err().to_string();
        assert!(err.contains("session.integrity_check_timeout"), "{err}");
        Ok(())
    });
}

/// Records are written in the binary format unless `record_format = "json"` (phase 1 of an
/// upgrade); anything else is refused naming the key.
#[test]
fn session_record_format() {
    use crate::session::RecordFormat;
    Jail::expect_with(|jail| {
        assert_eq!(load(jail, MINIMAL).expect("valid").session.record_format, RecordFormat::Binary);
        let c = load(jail, &format!("{MINIMAL}\nrecord_format = \"json\"")).expect("valid");
        assert_eq!(c.session.record_format, RecordFormat::Json);
        let err = load(jail, &format!("{MINIMAL}\nrecord_format = \"xml\"")).unwrap_err().to_string();
        assert!(err.contains("record_format"), "{err}");
        Ok(())
    });
}

/// redb's cache is bounded by default (16 MiB, not redb's 1 GiB), can be set, and not below 1 MiB.
#[test]
fn session_cache_bytes() {
    Jail::expect_with(|jail| {
        assert_eq!(load(jail, MINIMAL).expect("valid").session.cache_bytes, 16 << 20);
        let c = load(jail, &format!("{MINIMAL}\ncache_bytes = 67108864")).expect("valid");
        assert_eq!(c.session.cache_bytes, 64 << 20);
        let err = load(jail, &format!("{MINIMAL}\ncache_bytes = 1000")).unwrap_err().to_string();
        assert!(err.contains("session.cache_bytes"), "{err}");
        Ok(())
    });
}

#[test]
fn unknown_key_is_named() {
    Jail::expect_with(|jail| {
        let err = load(jail, &format!("{MINIMAL}\n[admin]\nlisten = \"127.0.0.1:9\"\nlisen = 1\n")).unwrap_err();
        assert!(err.to_string().contains("lisen"), "{err}");
        Ok(())
    });
}

#[test]
fn env_overrides_nest_with_double_underscore() {
    Jail::expect_with(|jail| {
        jail.set_env("GATEHOUSE_OIDC__CLIENT_ID", "from-env");
        jail.set_env("GATEHOUSE_SESSION__IDLE_TIMEOUT", "5m");
        let c = load(jail, MINIMAL).expect("valid");
        assert_eq!(c.oidc.client_id, "from-env");
        assert_eq!(c.session.idle_timeout, Duration::from_secs(300));
        Ok(())
    });
}

#[test]
fn bad_values_name_the_key() {
    Jail::expect_with(|jail| {
        let cases = [
            (MINIMAL.replace("http://localhost:8080", "http://example.com"), "public.external_url"),
            (MINIMAL.replace("http://127.0.0.1:8180", "http://idp.example.com"), "oidc.issuer"),
            (format!("{MINIMAL}\nidle_timeout = \"soon\""), "idle_timeout"),
            (MINIMAL.replace("client_secret = \"s3cret\"", ""), "oidc.client_secret_file"),
            (format!("{MINIMAL}\ncookie_name = \"gatehouse\""), "session.cookie_name"),
            (format!("{MINIMAL}\n[admin]\nlisten = \"0.0.0.0:9090\""), "admin.token_file"),
            (format!("{MINIMAL}\n[admin]\nlisten = \"10.0.0.5:9090\""), "admin.token_file"),
            (
                MINIMAL.replace("client_id = \"gatehouse\"", "client_id = \"gatehouse\"\nalgorithms = [\"HS256\"]"),
                "oidc.algorithms",
            ),
            (
                MINIMAL.replace("client_id = \"gatehouse\"", "client_id = \"gatehouse\"\nalgorithms = [\"none\"]"),
                "oidc.algorithms",
            ),
        ];
        for (text, key) in cases {
            let err = load(jail, &text).unwrap_err().to_string();
            assert!(err.contains(key), "expected `{key}` in: {err}");
        }
        Ok(())
    });
}

#[test]
fn redis_modes_and_tls_files_are_validated() {
    Jail::expect_with(|jail| {
        let redis = |extra: &str| MINIMAL.replace("[session]", &format!("[session]\nstore = \"redis\"\n{extra}"));
        assert!(load(jail, &redis("redis_url = \"rediss://r:6380\"\nredis_ca_file = \"ca.pem\"")).is_ok());
        for (extra, key) in [
            ("", "session.redis_url"),
            ("redis_url = \"http://r\"", "session.redis_url"),
            ("redis_url = \"redis://r\"\nredis_cluster_nodes = [\"redis://a\"]", "exactly one"),
            ("redis_sentinels = [\"rediss://s\"]\nredis_master_name = \"m\"", "session.redis_sentinels"),
            ("redis_sentinels = [\"redis://s\"]", "session.redis_master_name"),
            ("redis_cluster_nodes = [\"rediss://a\", \"redis://b\"]", "all nodes or for none"),
            ("redis_url = \"rediss://r\"\nredis_client_cert_file = \"c.pem\"", "together"),
            ("redis_url = \"redis://r\"\nredis_master_name = \"m\"", "applies only to redis_sentinels"),
            ("redis_url = \"redis://r\"\nredis_ca_file = \"ca.pem\"", "applies only to rediss://"),
        ] {
            let err = load(jail, &redis(extra)).unwrap_err().to_string();
            assert!(err.contains(key), "{extra}: expected `{key}` in: {err}");
        }
        Ok(())
    });
}

#[test]
fn routes_are_validated() {
    Jail::expect_with(|jail| {
        let route = |prefix: &str, upstream: &str| {
            format!("{MINIMAL}\n[[routes]]\nprefix = \"{prefix}\"\nupstream = \"{upstream}\"\nrelay = \"session\"\n")
        };
        let c = load(jail, &route("/api/pb/", "http://127.0.0.1:8090/")).expect("valid");
        assert_eq!(c.routes[0].relay, Relay::Session);
        assert_eq!(c.routes[0].timeout, Duration::from_secs(60));
        for (prefix, upstream, key) in [
            ("/pb/", "http://127.0.0.1:8090/", "routes.prefix"),
            ("/api/pb", "http://127.0.0.1:8090/", "routes.prefix"),
            ("/api/", "http://127.0.0.1:8090/", "routes.prefix"),
            ("/api/../auth/", "http://127.0.0.1:8090/", "routes.prefix"),
            ("/api//pb/", "http://127.0.0.1:8090/", "routes.prefix"),
            ("/api/p%62/", "http://127.0.0.1:8090/", "routes.prefix"),
            ("/api/pb/", "https://127.0.0.1:8090/", "routes.ca_file"),
            ("/api/pb/", "ftp://127.0.0.1:8090/", "routes.upstream"),
            ("/api/pb/", "http://127.0.0.1:8090/x", "routes.upstream"),
            ("/api/pb/", "http://u:p@127.0.0.1:8090/", "routes.upstream"),
            ("/api/pb/", "http://127.0.0.1:8090/?q=1", "routes.upstream"),
        ] {
            let err = load(jail, &route(prefix, upstream)).unwrap_err().to_string();
            assert!(err.contains(key), "{prefix} {upstream}: expected `{key}` in: {err}");
        }
        let twice = format!(
            "{}{}",
            route("/api/pb/", "http://127.0.0.1:1/"),
            route("/api/pb/", "http://127.0.0.2:1/").replace(MINIMAL, "")
        );
        assert!(load(jail, &twice).unwrap_err().to_string().contains("listed twice"));
        let unknown = route("/api/pb/", "http://a/").replace("relay = \"session\"", "relay = \"cookie\"");
        assert!(load(jail, &unknown).is_err(), "unknown relay");
        Ok(())
    });
}

#[test]
fn plain_http_relay_to_a_remote_host_needs_an_explicit_opt_in() {
    Jail::expect_with(|jail| {
        let route = |upstream: &str, relay: &str, extra: &str| {
            format!(
                "{MINIMAL}\n[[routes]]\nprefix = \"/api/pb/\"\nupstream = \"{upstream}\"\nrelay = \"{relay}\"\n{extra}"
            )
        };
        for relay in ["session", "bearer"] {
            for upstream in ["http://pocketbase.internal:8090/", "http://10.0.0.8:8090/", "http://127.0.0.1.nip.io/"] {
                let err = load(jail, &route(upstream, relay, "")).unwrap_err().to_string();
                assert!(
                    err.contains("routes.upstream") && err.contains("allow_plaintext_relay"),
                    "{relay} {upstream}: {err}"
                );
                let c = load(jail, &route(upstream, relay, "allow_plaintext_relay = true")).expect("opted in");
                assert!(c.warnings().iter().any(|w| w.contains("allow_plaintext_relay")), "{relay} {upstream}");
            }
            for upstream in ["http://127.0.0.1:8090/", "http://localhost:8090/", "http://[::1]:8090/"] {
                let c = load(jail, &route(upstream, relay, "")).expect("loopback is fine");
                assert!(c.warnings().iter().all(|w| !w.contains("allow_plaintext_relay")), "{upstream}");
            }
        }
        Ok(())
    });
}

#[test]
fn insecure_http_drops_prefix_and_secure() {
    Jail::expect_with(|jail| {
        let text = MINIMAL
            .replace("http://localhost:8080", "http://gatehouse.internal:8080")
            .replace("[oidc]", "allow_insecure_http = true\n[oidc]");
        let c = load(jail, &text).expect("valid");
        let cookie = c.cookie();
        assert!(!cookie.secure);
        assert_eq!(cookie.name, "Http-gatehouse");
        assert!(!c.warnings().is_empty());
        Ok(())
    });
}

#[test]
fn check_listener_needs_a_caller_credential_off_loopback() {
    Jail::expect_with(|jail| {
        fn err(jail: &mut Jail, text: &str) -> String {
            load(jail, text).err().map(|e| e.to_string()).unwrap_or_default()
        }
        let c = load(jail, &format!("{MINIMAL}\n[check]\n")).expect("loopback default");
        assert!(c.check.as_ref().is_some_and(|c| c.listen.ip().is_loopback() && !c.mtls()));
        let e = err(jail, &format!("{MINIMAL}\n[check]\nlisten = \"0.0.0.0:8444\""));
        assert!(e.contains("check.listen") && e.contains("mutual TLS"), "{e}");
        jail.create_file("short.key", "tooshort")?;
        let e = err(jail, &format!("{MINIMAL}\n[check]\nlisten = \"0.0.0.0:8444\"\nkey_file = \"short.key\""));
        assert!(e.contains("check.key_file"), "{e}");
        jail.create_file("check.key", &"k".repeat(40))?;
        let c = load(jail, &format!("{MINIMAL}\n[check]\nlisten = \"0.0.0.0:8444\"\nkey_file = \"check.key\""))
            .expect("a shared key is enough");
        assert!(c.warnings().iter().any(|w| w.contains("check.listen")), "plain HTTP off loopback warns");
        let e = err(jail, &format!("{MINIMAL}\n[check]\ncert = \"check.key\""));
        assert!(e.contains("check.key") && e.contains("go together"), "{e}");
        let e = err(jail, &format!("{MINIMAL}\n[check]\nclaim_headers = [\"password\"]"));
        assert!(e.contains("check.claim_headers"), "{e}");
        let e = err(jail, &format!("{MINIMAL}\n[check]\nlisten = \"127.0.0.1:8080\""));
        assert!(e.contains("must differ"), "{e}");
        Ok(())
    });
}

/// SECURITY 22: `internal.allow` holds exact identities only. Patterns, prefixes, other schemes
/// and names a certificate could never carry are refused at start-up, naming the key and entry.
#[test]
fn internal_allow_entries_are_exact_spiffe_ids_or_dns_names() {
    Jail::expect_with(|jail| {
        let with = |entry: &str| {
            format!("{MINIMAL}\n[internal]\nmode = \"envoy\"\nlisten = \"127.0.0.1:9443\"\nallow = [\"{entry}\"]\n")
        };
        for good in [
            "spiffe://cluster.local/ns/data/sa/pocketbase",
            "spiffe://gatehouse.local",
            "pocketbase.data.svc.cluster.local",
            "pocketbase",
        ] {
            let config = load(jail, &with(good)).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!(config.internal.map(|i| i.allow), Some(vec![good.to_string()]));
        }
        for bad in [
            "",
            "spiffe://cluster.local/ns/*/sa/pocketbase",
            "spiffe://cluster.local/ns/data/sa/",
            "spiffe://cluster.local/ns/../sa/pocketbase",
            "spiffe://cluster.local/ns//sa/pocketbase",
            "spiffe://Cluster.Local/ns/data/sa/pocketbase",
            "SPIFFE://cluster.local/ns/data/sa/pocketbase",
            "https://pocketbase.data.svc",
            "*.data.svc.cluster.local",
            "pocketbase.data.svc.cluster.local.",
            "PocketBase",
            "pocket_base",
            "-pocketbase",
            "pocketbase/ns/data",
        ] {
            let e = load(jail, &with(bad)).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("internal.allow") && e.contains("matched exactly"), "{bad:?} must be refused: {e}");
        }
        Ok(())
    });
}
