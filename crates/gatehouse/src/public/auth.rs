//! `/auth/*`: starting and finishing the code flow, password login, `/auth/me`, logout.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::login_state::{self, LoginState};
use super::{PublicState, cookies, limits, return_to};
use crate::config::SameSite;
use crate::crypto;
use crate::error::ApiError;
use crate::exchange::ClientInfo;
use crate::metrics::{LoginLabels, LoginOutcome};
use crate::oidc::LoginResult;
use crate::session::{SessionId, SessionRecord};

#[derive(Deserialize)]
pub struct LoginQuery {
    return_to: Option<String>,
}

/// A fetch/XHR (not a navigation) must never get a redirect: it gets JSON.
fn is_fetch(headers: &HeaderMap) -> bool {
    let mode = headers.get("sec-fetch-mode").and_then(|v| v.to_str().ok());
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    matches!(mode, Some(m) if m != "navigate") || (accept.contains("application/json") && !accept.contains("text/html"))
}

fn no_store(resp: &mut Response) {
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// `GET /auth/login?return_to=/path`: start the authorization code flow with PKCE.
pub async fn login_start(
    State(st): State<Arc<PublicState>>,
    Query(q): Query<LoginQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let core = &st.core;
    let login = LoginState {
        state: crypto::random_token().map_err(|_| ApiError::Internal)?,
        nonce: crypto::random_token().map_err(|_| ApiError::Internal)?,
        verifier: crypto::random_token().map_err(|_| ApiError::Internal)?,
        return_to: return_to::sanitize(q.return_to.as_deref()),
        started_at: core.exchange.now(),
    };
    let url = core.exchange.authorization_url(&login.state, &login.nonce, &login.verifier).await?;
    let mut login = login;
    let mut sealed = login.seal(&core.keyring).ok_or(ApiError::Internal)?;
    // Keep the cookie under the 4 KB browsers accept (SECURITY 3): a huge return_to becomes `/`.
    if sealed.len() > 3500 {
        login.return_to = "/".into();
        sealed = login.seal(&core.keyring).ok_or(ApiError::Internal)?;
    }
    let mut resp = if is_fetch(&headers) {
        Json(json!({"login_url": url})).into_response()
    } else {
        (StatusCode::SEE_OTHER, [(header::LOCATION, url)]).into_response()
    };
    resp.headers_mut().append(header::SET_COOKIE, cookies::login(&st.cookie, &sealed, login_state::LIFETIME));
    no_store(&mut resp);
    Ok(resp)
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    iss: Option<String>,
    error: Option<String>,
}

/// `GET /auth/callback`: finish the code flow and create the session.
pub async fn callback(
    State(st): State<Arc<PublicState>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    Query(q): Query<CallbackQuery>,
    headers: HeaderMap,
) -> Response {
    let ip = limits::client_ip(peer, &headers, &st.settings.trusted_proxies);
    // Whatever happens, the login cookie is single-use.
    let mut resp = match finish_login(&st, q, &headers, ip).await {
        Ok(resp) => resp,
        Err(e) => {
            st.core.metrics.logins.get_or_create(&LoginLabels { outcome: LoginOutcome::Failed }).inc();
            e.into_response()
        }
    };
    resp.headers_mut().append(header::SET_COOKIE, cookies::clear_login(&st.cookie));
    no_store(&mut resp);
    resp
}

async fn finish_login(
    st: &PublicState,
    q: CallbackQuery,
    headers: &HeaderMap,
    ip: std::net::IpAddr,
) -> Result<Response, ApiError> {
    let core = &st.core;
    let login = cookies::read(headers, &st.cookie.login_name)
        .and_then(|v| LoginState::open(&v, &core.keyring, core.exchange.now()))
        .ok_or_else(|| {
            ApiError::bad_request(
                "login_state_missing",
                "no login in progress in this browser (or it expired); start again",
            )
        })?;
    if let Some(err) = q.error {
        let err: String = err.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(64).collect();
        tracing::info!(provider_error = %err, "login refused by the identity provider");
        return Err(ApiError::bad_request("login_failed", format!("the identity provider refused the login: {err}")));
    }
    let (Some(code), Some(state)) = (q.code, q.state) else {
        return Err(ApiError::bad_request("login_failed", "callback without code or state"));
    };
    if !crypto::ct_eq(state.as_bytes(), login.state.as_bytes()) {
        tracing::warn!("login callback with a state that does not match this browser's login");
        return Err(ApiError::bad_request("login_failed", "state does not match the login started in this browser"));
    }
    let result = core.exchange.redeem_code(q.iss.as_deref(), &code, &login.verifier, &login.nonce).await?;
    // The core refuses a login whose provider session was logged out meanwhile (back-channel).
    let (id, _) = start_session(st, result, headers, ip).await?;
    let mut resp = match st.cookie.same_site {
        SameSite::Lax => (StatusCode::SEE_OTHER, [(header::LOCATION, login.return_to)]).into_response(),
        // A Strict cookie set during a cross-site redirect chain is not sent on the next hop, so
        // land on a same-site page that navigates on.
        SameSite::Strict => Html(strict_landing(&login.return_to)).into_response(),
    };
    resp.headers_mut().append(header::SET_COOKIE, cookies::session(&st.cookie, id.expose()));
    Ok(resp)
}

fn strict_landing(return_to: &str) -> String {
    let escaped: String = return_to
        .chars()
        .map(|c| match c {
            '&' => "&amp;".into(),
            '"' => "&quot;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '\'' => "&#39;".into(),
            c => c.to_string(),
        })
        .collect();
    format!(
        "<!doctype html><meta charset=utf-8><meta http-equiv=refresh content=\"0;url={escaped}\"><title>Signed in</title><a href=\"{escaped}\">Continue</a>"
    )
}

async fn start_session(
    st: &PublicState,
    result: LoginResult,
    headers: &HeaderMap,
    ip: std::net::IpAddr,
) -> Result<(SessionId, SessionRecord), ApiError> {
    let sub = result.claims.sub.clone();
    let client = ClientInfo {
        ip: Some(ip.to_string()),
        user_agent: headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).map(str::to_owned),
    };
    let (id, record) = st.core.exchange.start(result, client).await?;
    st.core.metrics.logins.get_or_create(&LoginLabels { outcome: LoginOutcome::Ok }).inc();
    tracing::info!(sub = %sub, session = %id.key(), "login succeeded, session created");
    Ok((id, record))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PasswordLogin {
    username: String,
    password: String,
}

/// `POST /auth/login` with `{"username","password"}` (when `oidc.password_login` is on).
pub async fn password_login(
    State(st): State<Arc<PublicState>>,
    axum::extract::ConnectInfo(peer): axum::extract::ConnectInfo<std::net::SocketAddr>,
    headers: HeaderMap,
    body: Result<Json<PasswordLogin>, JsonRejection>,
) -> Result<Response, ApiError> {
    let core = &st.core;
    if !st.settings.password_login {
        return Err(ApiError::NotFound);
    }
    let Json(body) = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::bad_request(
                "invalid_request",
                format!("expected {{\"username\",\"password\"}}: {}", e.body_text()),
            )
        }
    })?;
    if body.username.is_empty() || body.username.len() > 256 || body.password.is_empty() || body.password.len() > 1024 {
        return Err(ApiError::bad_request("invalid_request", "username or password empty or too long"));
    }
    let ip = limits::client_ip(peer, &headers, &st.settings.trusted_proxies);
    if let Err(e) = limits::login_attempt(&core.limiter, ip, &body.username).await {
        // No username in the line: log lines name users by `sub` only, and this one is unverified.
        tracing::warn!(%ip, error = e.code(), "password login refused by its rate limit");
        return Err(e);
    }
    let result = match core.exchange.password_grant(&body.username, &body.password).await {
        Ok(r) => r,
        Err(e) => {
            core.metrics.logins.get_or_create(&LoginLabels { outcome: LoginOutcome::Failed }).inc();
            // Not the typed name (lines name users by `sub` only, and a password typed into the
            // wrong field would land here): a short hash still shows repeated attempts.
            let username_hash = crate::crypto::hex(&crate::crypto::sha256(body.username.as_bytes())[..4]);
            tracing::info!(%ip, %username_hash, error = %e, "password login failed");
            return Err(e.into());
        }
    };
    let (id, record) = start_session(&st, result, &headers, ip).await?;
    let mut resp = Json(me_body(&record)).into_response();
    resp.headers_mut().append(header::SET_COOKIE, cookies::session(&st.cookie, id.expose()));
    no_store(&mut resp);
    Ok(resp)
}

fn session_id(st: &PublicState, headers: &HeaderMap) -> Option<SessionId> {
    cookies::read(headers, &st.cookie.name).and_then(|v| SessionId::parse(&v))
}

pub(crate) fn me_body(r: &SessionRecord) -> MeBody<'_> {
    MeBody { claims: r.claims.shown(), session: r.times() }
}

/// The user as `/auth/me` and the login answer show them: serialised from the record as it is
/// (borrowed, not copied into a `serde_json::Value` first — the hottest path). Never a token.
#[derive(Serialize)]
pub(crate) struct MeBody<'a> {
    #[serde(flatten)]
    claims: crate::oidc::ShownClaims<'a>,
    session: crate::session::SessionTimes,
}

/// `GET /auth/me`: who the session belongs to. Never a token.
pub async fn me(State(st): State<Arc<PublicState>>, req: axum::extract::Request) -> Result<Response, ApiError> {
    // The request, not a `HeaderMap` extractor: that would clone every header on the hottest path.
    let headers = req.headers();
    if let Some(refused) = super::csrf::cross_origin_read(headers) {
        return Err(refused);
    }
    let id = session_id(&st, headers).ok_or(ApiError::Unauthenticated)?;
    let resolved = st.core.exchange.resolve(&id, false).await?;
    let mut resp = Json(me_body(&resolved.record)).into_response();
    no_store(&mut resp);
    Ok(resp)
}

/// `POST /auth/logout`: delete the session, revoke the refresh token, clear the cookie, and hand
/// the browser the provider's end-session URL.
pub async fn logout(State(st): State<Arc<PublicState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    let core = &st.core;
    let id = session_id(&st, &headers);
    let logout_url = core.exchange.logout(id.as_ref(), &st.settings.post_logout_redirect_uri).await?;
    let mut resp = Json(json!({"logout_url": logout_url})).into_response();
    let h = resp.headers_mut();
    h.append(header::SET_COOKIE, cookies::clear_session(&st.cookie));
    h.insert("clear-site-data", HeaderValue::from_static("\"cookies\""));
    no_store(&mut resp);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    /// SECURITY 10: a fetch or XHR gets JSON, never a redirect — told by `Sec-Fetch-Mode`, or by
    /// `Accept` from clients that send no fetch metadata; a navigation gets the redirect.
    #[test]
    fn fetches_are_told_from_navigations() {
        for (what, h, fetch) in [
            ("fetch()", headers(&[("sec-fetch-mode", "cors")]), true),
            ("same-origin fetch", headers(&[("sec-fetch-mode", "same-origin")]), true),
            ("navigation", headers(&[("sec-fetch-mode", "navigate")]), false),
            ("XHR asking for JSON", headers(&[("accept", "application/json")]), true),
            ("JSON with parameters", headers(&[("accept", "application/json; charset=utf-8")]), true),
            ("a browser's page load", headers(&[("accept", "text/html,application/xhtml+xml,*/*;q=0.8")]), false),
            ("HTML or JSON: the page wins", headers(&[("accept", "text/html, application/json")]), false),
            (
                "a navigation asking only for JSON",
                headers(&[("sec-fetch-mode", "navigate"), ("accept", "application/json")]),
                true,
            ),
            ("no hint at all", headers(&[]), false),
        ] {
            assert_eq!(is_fetch(&h), fetch, "{what}");
        }
    }
}
