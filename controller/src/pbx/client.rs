//! The PBX REST API (v22) as used by imfleet: OAuth password login with
//! refresh and revoke, IP whitelist, IM token, IM server addresses. 429 and
//! 5xx answers are retried with backoff, a bounded number of times.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::tls::{PbxTrust, client_config};

/// The PBX's documented OAuth client id for its own administrators.
pub const OAUTH_CLIENT_ID: &str = "9d806019-75b2-4b3d-bb8b-f5a3a412cc0a";
/// Refresh the access token when it has less than this left.
const REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// Whitelist entries imfleet creates expire this far in the future.
const WHITELIST_YEARS: i64 = 10;

/// A secret string: never shown by `Debug`.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// How to reach and log in to the PBX.
#[derive(Debug, Clone)]
pub struct PbxOptions {
    /// e.g. `https://10.0.0.2:8887`
    pub base_url: String,
    pub user: String,
    pub password: Secret,
    pub trust: PbxTrust,
    /// Retries of a request answered 429/5xx or not answered at all.
    pub max_retries: u32,
    pub first_backoff: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PbxError {
    #[error(
        "{what}: the PBX answered {status} redirecting to `{to}`; imfleet follows no redirect (it would re-send the credentials). Give the portal's final https:// address as --pbx-api"
    )]
    Redirected {
        what: String,
        status: u16,
        to: String,
    },
    #[error(
        "the PBX refused the login of `{user}` (401): {message}. Check --pbx-user and the password"
    )]
    LoginRefused { user: String, message: String },
    #[error(
        "the PBX answered 401 to {what}: {message}; the session expired and could not be renewed"
    )]
    Unauthorized { what: String, message: String },
    #[error("the PBX answered 403 to {what}: {message}. The account needs administrator rights")]
    Forbidden { what: String, message: String },
    #[error(
        "the PBX kept rate-limiting {what} (429) after {attempts} attempts; whitelist this controller's address on the PBX or retry later"
    )]
    RateLimited { what: String, attempts: u32 },
    #[error("the PBX failed {what} with {status} after {attempts} attempts: {message}")]
    Server {
        what: String,
        status: u16,
        attempts: u32,
        message: String,
    },
    #[error("the PBX answered {what} with {status}: {message}")]
    Rejected {
        what: String,
        status: u16,
        message: String,
    },
    #[error("cannot reach the PBX API at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the PBX's answer to {what} is not what the API documents: {detail}")]
    Protocol { what: String, detail: String },
    #[error("PBX API settings: {0}")]
    Config(String),
    #[error(
        "the PBX blacklists {cidr} (filter {id}); remove that entry in the portal (IP Blacklist) first"
    )]
    Blacklisted { cidr: String, id: String },
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
    refresh_token: String,
}

struct Session {
    access: Secret,
    refresh: Secret,
    expires_at: Instant,
}

/// A logged-in client. Call [`PbxClient::logout`] when done.
pub struct PbxClient {
    http: reqwest::Client,
    options: PbxOptions,
    session: Mutex<Session>,
}

impl std::fmt::Debug for PbxClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PbxClient")
            .field("base_url", &self.options.base_url)
            .finish_non_exhaustive()
    }
}

/// The IM server's addresses as the PBX knows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImAddresses {
    #[serde(default)]
    pub private_ipv4: String,
    #[serde(default)]
    pub private_ipv6: String,
    #[serde(default)]
    pub public_ipv4: String,
    #[serde(default)]
    pub public_ipv6: String,
}

impl ImAddresses {
    pub fn from_ips(private: IpAddr, public: IpAddr) -> ImAddresses {
        let mut a = ImAddresses::default();
        match private {
            IpAddr::V4(v4) => a.private_ipv4 = v4.to_string(),
            IpAddr::V6(v6) => a.private_ipv6 = v6.to_string(),
        }
        match public {
            IpAddr::V4(v4) => a.public_ipv4 = v4.to_string(),
            IpAddr::V6(v6) => a.public_ipv6 = v6.to_string(),
        }
        a
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IpFilter {
    #[serde(default)]
    pub id: String,
    pub cidr: String,
    pub target: String,
    #[serde(default)]
    pub expire_at: String,
    #[serde(default)]
    pub description: String,
}

/// Whether a whitelist entry was found or made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Whitelisted {
    pub cidr: String,
    pub id: String,
    pub created: bool,
}

/// Runs every parser the client applies to a PBX answer over `body`; for
/// the fuzzer (`fuzz/`), which must find no panic. Returns how many parsed.
#[doc(hidden)]
pub fn parse_answer(body: &str) -> usize {
    usize::from(!message_of(body).is_empty())
        + usize::from(serde_json::from_str::<TokenResponse>(body).is_ok())
        + usize::from(serde_json::from_str::<ImAddresses>(body).is_ok())
        + usize::from(serde_json::from_str::<Vec<IpFilter>>(body).is_ok())
}

fn message_of(body: &str) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<ErrorItem>,
    }
    #[derive(Deserialize)]
    struct ErrorItem {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_str::<Errors>(body) {
        Ok(e) if !e.errors.is_empty() => e
            .errors
            .iter()
            .map(|i| format!("{} {}", i.code, i.message).trim().to_owned())
            .collect::<Vec<_>>()
            .join("; "),
        _ => body.chars().take(200).collect(),
    }
}

fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(30)))
}

impl PbxClient {
    /// Logs in with the documented OAuth password grant.
    pub async fn login(options: PbxOptions) -> Result<PbxClient, PbxError> {
        if !options.base_url.starts_with("https://") {
            return Err(PbxError::Config(format!(
                "--pbx-api {}: must be an https:// URL",
                options.base_url
            )));
        }
        if matches!(options.trust, PbxTrust::Insecure) {
            tracing::warn!(
                "--pbx-insecure: the PBX certificate is NOT verified; the PBX password can be intercepted"
            );
        }
        // A redirect would re-send the password form (307/308) wherever
        // the answer points: never follow one, never leave HTTPS.
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .https_only(true)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30));
        if let Some(tls) = client_config(&options.trust).map_err(PbxError::Config)? {
            builder = builder.tls_backend_preconfigured(tls);
        }
        let http = builder
            .build()
            .map_err(|e| PbxError::Config(e.to_string()))?;
        let client = PbxClient {
            http,
            session: Mutex::new(Session {
                access: Secret::new(""),
                refresh: Secret::new(""),
                expires_at: Instant::now(),
            }),
            options,
        };
        let form = [
            ("grant_type", "password"),
            ("username", client.options.user.as_str()),
            ("password", client.options.password.expose()),
            ("scope", "all"),
            ("client_id", OAUTH_CLIENT_ID),
        ];
        let token = client
            .token_request(&form, "login")
            .await
            .map_err(|e| match e {
                PbxError::Unauthorized { message, .. }
                | PbxError::Rejected {
                    message,
                    status: 400,
                    ..
                } => PbxError::LoginRefused {
                    user: client.options.user.clone(),
                    message,
                },
                other => other,
            })?;
        *client.session.lock().await = token;
        Ok(client)
    }

    async fn token_request(&self, form: &[(&str, &str)], what: &str) -> Result<Session, PbxError> {
        let response = self
            .send(what, |http, base| {
                http.post(format!("{base}/api/login/oauth/token"))
                    .form(form)
            })
            .await?;
        let body: TokenResponse = response.json().await.map_err(|e| PbxError::Protocol {
            what: what.into(),
            detail: e.to_string(),
        })?;
        Ok(Session {
            access: Secret::new(body.access_token),
            refresh: Secret::new(body.refresh_token),
            expires_at: Instant::now() + Duration::from_secs(body.expires_in),
        })
    }

    /// A valid access token, refreshed first when it is about to expire.
    async fn bearer(&self, force_refresh: bool) -> Result<String, PbxError> {
        let mut session = self.session.lock().await;
        if force_refresh
            || session.expires_at.saturating_duration_since(Instant::now()) < REFRESH_MARGIN
        {
            let refresh = session.refresh.expose().to_owned();
            let form = [
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh.as_str()),
                ("client_id", OAUTH_CLIENT_ID),
            ];
            *session = self.token_request(&form, "token refresh").await?;
        }
        Ok(session.access.expose().to_owned())
    }

    /// Sends with retries on 429, 5xx and connection failures.
    async fn send(
        &self,
        what: &str,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, PbxError> {
        let base = self.options.base_url.trim_end_matches('/');
        let mut backoff = self.options.first_backoff;
        let attempts = self.options.max_retries + 1;
        for attempt in 1..=attempts {
            let last = attempt == attempts;
            match build(&self.http, base).send().await {
                Err(e) => {
                    if last {
                        return Err(PbxError::Unreachable {
                            url: base.to_owned(),
                            detail: crate::error_chain(&e),
                        });
                    }
                }
                Ok(response) => {
                    let status = response.status();
                    if status.is_success() {
                        return Ok(response);
                    }
                    let wait = retry_after(&response);
                    let response_location = response
                        .headers()
                        .get(reqwest::header::LOCATION)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let message = message_of(&response.text().await.unwrap_or_default());
                    let what = what.to_owned();
                    match status {
                        StatusCode::TOO_MANY_REQUESTS if last => {
                            return Err(PbxError::RateLimited { what, attempts });
                        }
                        s if s.is_server_error() && last => {
                            return Err(PbxError::Server {
                                what,
                                status: s.as_u16(),
                                attempts,
                                message,
                            });
                        }
                        StatusCode::TOO_MANY_REQUESTS => {
                            if let Some(wait) = wait {
                                backoff = backoff.max(wait);
                            }
                        }
                        s if s.is_server_error() => {}
                        StatusCode::UNAUTHORIZED => {
                            return Err(PbxError::Unauthorized { what, message });
                        }
                        StatusCode::FORBIDDEN => return Err(PbxError::Forbidden { what, message }),
                        s if s.is_redirection() => {
                            let to = response_location.unwrap_or_default();
                            return Err(PbxError::Redirected {
                                what,
                                status: s.as_u16(),
                                to,
                            });
                        }
                        s => {
                            return Err(PbxError::Rejected {
                                what,
                                status: s.as_u16(),
                                message,
                            });
                        }
                    }
                }
            }
            tracing::info!(what, attempt, ?backoff, "PBX busy or unreachable; retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(8));
        }
        unreachable!("the last attempt always returns")
    }

    /// An authenticated call; a 401 gets one token refresh and one retry.
    async fn call(
        &self,
        method: Method,
        path: &str,
        json: Option<&serde_json::Value>,
    ) -> Result<reqwest::Response, PbxError> {
        let what = format!("{method} {path}");
        for refresh in [false, true] {
            let token = self.bearer(refresh).await?;
            let result = self
                .send(&what, |http, base| {
                    let request = http
                        .request(method.clone(), format!("{base}{path}"))
                        .bearer_auth(&token);
                    match json {
                        Some(body) => request.json(body),
                        None => request,
                    }
                })
                .await;
            match result {
                Err(PbxError::Unauthorized { .. }) if !refresh => continue,
                other => return other,
            }
        }
        unreachable!("the refreshed attempt always returns")
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        response: reqwest::Response,
        what: &str,
    ) -> Result<T, PbxError> {
        response.json().await.map_err(|e| PbxError::Protocol {
            what: what.into(),
            detail: e.to_string(),
        })
    }

    /// Ensures `ip` is whitelisted (ACCEPT, long expiry); reuses an existing entry.
    pub async fn ensure_whitelisted(
        &self,
        ip: IpAddr,
        description: &str,
    ) -> Result<Whitelisted, PbxError> {
        let cidr = match ip {
            IpAddr::V4(_) => format!("{ip}/32"),
            IpAddr::V6(_) => format!("{ip}/128"),
        };
        #[derive(Deserialize)]
        struct Page {
            count: u64,
            items: Vec<IpFilter>,
        }
        let mut skip = 0u64;
        loop {
            let path = format!("/api/ip_filters?filter=&search={ip}&skip={skip}&top=100");
            let response = self.call(Method::GET, &path, None).await?;
            let page: Page = self.json(response, "GET /api/ip_filters").await?;
            for item in &page.items {
                if item.cidr == cidr {
                    if item.target.eq_ignore_ascii_case("ACCEPT") {
                        return Ok(Whitelisted {
                            cidr,
                            id: item.id.clone(),
                            created: false,
                        });
                    }
                    return Err(PbxError::Blacklisted {
                        cidr,
                        id: item.id.clone(),
                    });
                }
            }
            skip += page.items.len() as u64;
            if page.items.is_empty() || skip >= page.count {
                break;
            }
        }
        let expire_at = (time::OffsetDateTime::now_utc()
            + time::Duration::days(365 * WHITELIST_YEARS))
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "2036-01-01T00:00:00Z".into());
        let description: String = description.chars().take(255).collect();
        let body = serde_json::json!({"cidr": cidr, "target": "ACCEPT", "expire_at": expire_at, "description": description});
        let response = self
            .call(Method::POST, "/api/ip_filters", Some(&body))
            .await?;
        #[derive(Deserialize)]
        struct Created {
            id: String,
        }
        let created: Created = self.json(response, "POST /api/ip_filters").await?;
        Ok(Whitelisted {
            cidr,
            id: created.id,
            created: true,
        })
    }

    /// The current IM server token.
    pub async fn im_token(&self) -> Result<Secret, PbxError> {
        self.token_at(Method::GET).await
    }

    /// Generates a new IM server token (the portal's "Generate Token").
    pub async fn generate_im_token(&self) -> Result<Secret, PbxError> {
        self.token_at(Method::POST).await
    }

    async fn token_at(&self, method: Method) -> Result<Secret, PbxError> {
        #[derive(Deserialize)]
        struct Token {
            token: String,
        }
        let what = format!("{method} /api/im/token");
        let response = self.call(method, "/api/im/token", None).await?;
        let token: Token = self.json(response, &what).await?;
        if token.token.trim().is_empty() {
            return Err(PbxError::Protocol {
                what,
                detail: "empty token".into(),
            });
        }
        Ok(Secret::new(token.token))
    }

    pub async fn set_im_addresses(&self, addresses: &ImAddresses) -> Result<(), PbxError> {
        let body = serde_json::to_value(addresses).unwrap_or_default();
        self.call(Method::POST, "/api/im", Some(&body)).await?;
        Ok(())
    }

    pub async fn im_addresses(&self) -> Result<ImAddresses, PbxError> {
        let response = self.call(Method::GET, "/api/im", None).await?;
        self.json(response, "GET /api/im").await
    }

    /// Revokes the session's token. Best effort: failures are logged.
    pub async fn logout(self) {
        let token = self.session.lock().await.access.expose().to_owned();
        let result = self
            .send("logout", |http, base| {
                http.post(format!("{base}/api/login/oauth/revoke"))
                    .bearer_auth(&token)
            })
            .await;
        if let Err(e) = result {
            tracing::warn!("could not revoke the PBX session: {e}");
        }
    }
}
