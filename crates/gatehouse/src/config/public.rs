//! `[public]`: the North-South listener — where it binds, the origin browsers see, proxies it
//! trusts for the client address, per-IP rate limits and static files.

use super::*;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicConfig {
    /// Address the public listener binds.
    #[serde(default = "defaults::public_listen")]
    pub listen: SocketAddr,
    /// The URL browsers use to reach Gatehouse; base of the redirect URI and of CSRF origin checks.
    pub external_url: Url,
    /// Directory of static front-end files served for paths no route claims.
    #[serde(default)]
    pub static_dir: Option<PathBuf>,
    /// Allow a plain-http `external_url` that is not localhost (the cookie then loses `Secure` and its prefix).
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// Peers (IPs or CIDRs) whose `X-Forwarded-For` is trusted for the client IP (rate limits, audit).
    #[serde(default, deserialize_with = "de_networks")]
    pub trusted_proxies: Vec<IpNet>,
    /// Largest request body accepted on `/auth/*` routes.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: usize,
    /// Requests per second each client IP may make (sustained); 0 (the default) turns the limit off.
    #[serde(default = "defaults::rate_limit_per_second")]
    pub rate_limit_per_second: u32,
    /// Requests a client IP may make in a burst above the sustained rate.
    #[serde(default = "defaults::rate_limit_burst")]
    pub rate_limit_burst: u32,
}

impl PublicConfig {
    /// The external URL is an origin browsers can trust with the cookie; limits are consistent.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let ext = &self.external_url;
        match ext.scheme() {
            "https" => {}
            "http" if is_localhost(ext) => {}
            "http" if self.allow_insecure_http => {}
            "http" => {
                return Err(invalid(
                    "public.external_url",
                    "plain http is only accepted for localhost; use https or set public.allow_insecure_http = true",
                ));
            }
            other => {
                return Err(invalid("public.external_url", format!("scheme `{other}` is not http or https")));
            }
        }
        if ext.query().is_some() || ext.fragment().is_some() || ext.path() != "/" {
            return Err(invalid(
                "public.external_url",
                "must be an origin only (scheme, host, port), no path or query",
            ));
        }
        if self.rate_limit_per_second > 0 && self.rate_limit_burst < self.rate_limit_per_second {
            return Err(invalid("public.rate_limit_burst", "must be at least public.rate_limit_per_second"));
        }
        if let Some(dir) = &self.static_dir
            && !dir.is_dir()
        {
            return Err(invalid("public.static_dir", format!("{} is not a directory", dir.display())));
        }
        Ok(())
    }
}
