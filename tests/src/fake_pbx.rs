//! A fake PortSIP PBX REST API (v22), faithful to the documented endpoints,
//! bodies, auth and error shape, served over HTTPS on loopback with a
//! throwaway certificate. Knobs let tests expire tokens, rate-limit and fail.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

pub const CLIENT_ID: &str = "9d806019-75b2-4b3d-bb8b-f5a3a412cc0a";

#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub id: String,
    pub cidr: String,
    pub target: String,
    pub expire_at: String,
    pub description: String,
}

/// Everything the fake knows and counts; tests read and set it directly.
#[derive(Debug)]
pub struct PbxState {
    pub admin_user: String,
    pub admin_password: String,
    /// A user that logs in but is not an administrator (403 on API calls).
    pub operator_user: Option<(String, String)>,
    pub access_lifetime: Duration,
    access: HashMap<String, (Instant, bool)>,
    refresh: HashMap<String, bool>,
    pub filters: Vec<Filter>,
    pub im_token: String,
    pub im: Value,
    /// The next N API requests answer 429 (with Retry-After when set).
    pub throttle_next: u32,
    pub retry_after_secs: Option<u64>,
    /// The next N API requests answer 503.
    pub fail_next: u32,
    /// Accept `POST /api/im` but keep the old addresses (a misbehaving PBX).
    pub ignore_im_updates: bool,
    /// Answer the login with `307 Temporary Redirect` to this URL (a
    /// hijacked or misconfigured portal).
    pub redirect_login_to: Option<String>,
    pub logins: u32,
    pub refreshes: u32,
    pub revoked: u32,
    pub filters_created: u32,
    next_id: u64,
}

impl PbxState {
    fn new(admin_password: &str) -> Self {
        PbxState {
            admin_user: "admin".into(),
            admin_password: admin_password.into(),
            operator_user: None,
            access_lifetime: Duration::from_secs(1800),
            access: HashMap::new(),
            refresh: HashMap::new(),
            filters: Vec::new(),
            im_token: "pbx-im-token-0123456789abcdef".into(),
            im: json!({"private_ipv4": "", "private_ipv6": "", "public_ipv4": "", "public_ipv6": ""}),
            throttle_next: 0,
            retry_after_secs: None,
            fail_next: 0,
            ignore_im_updates: false,
            redirect_login_to: None,
            logins: 0,
            refreshes: 0,
            revoked: 0,
            filters_created: 0,
            next_id: 7005519097731481600,
        }
    }

    /// Expires every access token now (as a PBX restart or clock jump would).
    pub fn expire_all_access_tokens(&mut self) {
        for (expiry, _) in self.access.values_mut() {
            *expiry = Instant::now() - Duration::from_secs(1);
        }
    }

    /// Adds a whitelist entry as if made in the portal.
    pub fn add_filter(&mut self, cidr: &str, target: &str) -> String {
        let id = self.new_id();
        self.filters.push(Filter {
            id: id.clone(),
            cidr: cidr.into(),
            target: target.into(),
            expire_at: "2036-01-01T00:00:00Z".into(),
            description: "added in the portal".into(),
        });
        id
    }

    fn new_id(&mut self) -> String {
        self.next_id += 1;
        // Opaque ids like the PBX's ("NzAwNTUxOTA5NzczMTQ4MTYw"): base64 of digits.
        base64_digits(&self.next_id.to_string())
    }

    fn issue(&mut self, admin: bool) -> Value {
        let access = format!("at-{}", self.new_id());
        let refresh = format!("rt-{}", self.new_id());
        self.access.insert(
            access.clone(),
            (Instant::now() + self.access_lifetime, admin),
        );
        self.refresh.insert(refresh.clone(), admin);
        json!({
            "access_token": access,
            "expires_in": self.access_lifetime.as_secs(),
            "refresh_token": refresh,
            "token_type": "Bearer",
        })
    }
}

fn base64_digits(s: &str) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..=chunk.len() {
            out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

type Shared = Arc<Mutex<PbxState>>;

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"errors": [{"code": code, "message": message}]})),
    )
        .into_response()
}

fn bearer(headers: &HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
}

/// Checks throttling, failures and the bearer token of an API call. The
/// rejection is the response itself, so a large `Err` is intended.
#[allow(clippy::result_large_err)]
fn guard(state: &Shared, headers: &HeaderMap) -> Result<(), Response> {
    let mut s = state.lock().unwrap();
    if s.throttle_next > 0 {
        s.throttle_next -= 1;
        let mut response = error(
            StatusCode::TOO_MANY_REQUESTS,
            "TOO_MANY_REQUESTS",
            "rate limit exceeded (5000/min)",
        );
        if let Some(secs) = s.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, secs.to_string().parse().unwrap());
        }
        return Err(response);
    }
    if s.fail_next > 0 {
        s.fail_next -= 1;
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "service restarting",
        ));
    }
    match s.access.get(bearer(headers)) {
        Some((expiry, admin)) if *expiry > Instant::now() => {
            if *admin {
                Ok(())
            } else {
                Err(error(
                    StatusCode::FORBIDDEN,
                    "FORBIDDEN",
                    "administrator rights required",
                ))
            }
        }
        Some(_) => Err(error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "access token expired",
        )),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "invalid access token",
        )),
    }
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    refresh_token: String,
    #[serde(default)]
    client_id: String,
}

async fn token(State(state): State<Shared>, Form(form): Form<TokenForm>) -> Response {
    let mut s = state.lock().unwrap();
    if let Some(to) = &s.redirect_login_to {
        return (
            StatusCode::TEMPORARY_REDIRECT,
            [(axum::http::header::LOCATION, to.clone())],
        )
            .into_response();
    }
    if form.client_id != CLIENT_ID {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_CLIENT",
            "unknown client_id",
        );
    }
    match form.grant_type.as_str() {
        "password" => {
            let admin = form.username == s.admin_user && form.password == s.admin_password;
            let operator = s
                .operator_user
                .as_ref()
                .is_some_and(|(u, p)| *u == form.username && *p == form.password);
            if !admin && !operator {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "invalid username or password",
                );
            }
            s.logins += 1;
            Json(s.issue(admin)).into_response()
        }
        "refresh_token" => match s.refresh.remove(&form.refresh_token) {
            Some(admin) => {
                s.refreshes += 1;
                Json(s.issue(admin)).into_response()
            }
            None => error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "invalid refresh token",
            ),
        },
        _ => error(
            StatusCode::BAD_REQUEST,
            "UNSUPPORTED_GRANT_TYPE",
            "unsupported grant_type",
        ),
    }
}

async fn revoke(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let mut s = state.lock().unwrap();
    s.access.remove(bearer(&headers));
    s.revoked += 1;
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    search: String,
    #[serde(default)]
    skip: usize,
    #[serde(default)]
    top: Option<usize>,
}

fn filter_json(f: &Filter) -> Value {
    json!({"id": f.id, "cidr": f.cidr, "target": f.target, "expire_at": f.expire_at, "description": f.description})
}

async fn list_filters(State(state): State<Shared>, Query(q): Query<ListQuery>) -> Response {
    let top = q.top.unwrap_or(20);
    if top > 100 {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "top must be <= 100",
        );
    }
    let s = state.lock().unwrap();
    let matching: Vec<&Filter> = s
        .filters
        .iter()
        .filter(|f| {
            q.search.is_empty() || f.cidr.contains(&q.search) || f.description.contains(&q.search)
        })
        .collect();
    let items: Vec<Value> = matching
        .iter()
        .skip(q.skip)
        .take(top)
        .map(|f| filter_json(f))
        .collect();
    Json(json!({"count": matching.len(), "items": items})).into_response()
}

async fn create_filter(State(state): State<Shared>, Json(body): Json<Value>) -> Response {
    let text = |k: &str| body[k].as_str().unwrap_or_default().to_owned();
    let (cidr, target, expire_at, description) = (
        text("cidr"),
        text("target"),
        text("expire_at"),
        text("description"),
    );
    let cidr_ok = cidr.split_once('/').is_some_and(|(ip, bits)| {
        ip.parse::<std::net::IpAddr>().is_ok() && bits.parse::<u8>().is_ok_and(|b| b <= 128)
    });
    if !cidr_ok || !(target == "ACCEPT" || target == "DENY") || description.chars().count() > 255 {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "cidr, target or description invalid",
        );
    }
    if time::OffsetDateTime::parse(&expire_at, &time::format_description::well_known::Rfc3339)
        .is_err()
    {
        return error(
            StatusCode::BAD_REQUEST,
            "INVALID_ARGUMENT",
            "expire_at must be RFC 3339",
        );
    }
    let mut s = state.lock().unwrap();
    let id = s.new_id();
    s.filters.push(Filter {
        id: id.clone(),
        cidr,
        target,
        expire_at,
        description,
    });
    s.filters_created += 1;
    Json(json!({"id": id})).into_response()
}

async fn get_filter(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    let s = state.lock().unwrap();
    match s.filters.iter().find(|f| f.id == id) {
        Some(f) => Json(filter_json(f)).into_response(),
        None => error(StatusCode::NOT_FOUND, "NOT_FOUND", "no such filter"),
    }
}

async fn destroy_filter(State(state): State<Shared>, Path(id): Path<String>) -> Response {
    let mut s = state.lock().unwrap();
    s.filters.retain(|f| f.id != id);
    StatusCode::NO_CONTENT.into_response()
}

async fn get_im(State(state): State<Shared>) -> Response {
    Json(state.lock().unwrap().im.clone()).into_response()
}

async fn set_im(State(state): State<Shared>, Json(body): Json<Value>) -> Response {
    let mut s = state.lock().unwrap();
    if s.ignore_im_updates {
        return Json(s.im.clone()).into_response();
    }
    for key in ["private_ipv4", "private_ipv6", "public_ipv4", "public_ipv6"] {
        if let Some(v) = body[key].as_str() {
            if !v.is_empty() && v.parse::<std::net::IpAddr>().is_err() {
                return error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_ARGUMENT",
                    &format!("{key} is not an IP address"),
                );
            }
            s.im[key] = json!(v);
        }
    }
    Json(s.im.clone()).into_response()
}

async fn get_token(State(state): State<Shared>) -> Response {
    Json(json!({"token": state.lock().unwrap().im_token})).into_response()
}

async fn new_token(State(state): State<Shared>) -> Response {
    let mut s = state.lock().unwrap();
    let id = s.new_id();
    s.im_token = format!("pbx-im-token-{id}");
    Json(json!({"token": s.im_token})).into_response()
}

async fn destroy_token(State(state): State<Shared>) -> Response {
    state.lock().unwrap().im_token.clear();
    StatusCode::NO_CONTENT.into_response()
}

/// Runs [`guard`] in front of every authenticated endpoint.
async fn authenticate(
    State(state): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Err(rejection) = guard(&state, request.headers()) {
        return rejection;
    }
    next.run(request).await
}

/// A running fake PBX. Dropping it stops the server.
pub struct FakePbx {
    pub addr: SocketAddr,
    pub state: Shared,
    /// The portal's self-signed certificate (PEM) and its SHA-256 (hex).
    pub cert_pem: String,
    pub fingerprint: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakePbx {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakePbx {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Starts on 127.0.0.1 with a fresh self-signed certificate.
    pub async fn start(admin_password: &str) -> FakePbx {
        imfleet_certs::install_crypto_provider();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let fingerprint = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(cert.der()));
        let config = tokio_rustls::rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], rustls_pki_types_key(&key))
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let state: Shared = Arc::new(Mutex::new(PbxState::new(admin_password)));
        let authenticated = Router::new()
            .route("/api/login/oauth/revoke", post(revoke))
            .route("/api/ip_filters", get(list_filters).post(create_filter))
            .route("/api/ip_filters/{id}", get(get_filter))
            .route("/api/ip_filters/{id}/destroy", post(destroy_filter))
            .route("/api/im", get(get_im).post(set_im))
            .route("/api/im/token", get(get_token).post(new_token))
            .route("/api/im/token/destroy", post(destroy_token))
            .route_layer(axum::middleware::from_fn_with_state(
                state.clone(),
                authenticate,
            ));
        let app = Router::new()
            .route("/api/login/oauth/token", post(token))
            .merge(authenticated)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper_util::service::TowerToHyperService::new(app);
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
                });
            }
        });
        FakePbx {
            addr,
            state,
            cert_pem: cert.pem(),
            fingerprint,
            task,
        }
    }
}

fn rustls_pki_types_key(
    key: &rcgen::KeyPair,
) -> tokio_rustls::rustls::pki_types::PrivateKeyDer<'static> {
    tokio_rustls::rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into())
}
