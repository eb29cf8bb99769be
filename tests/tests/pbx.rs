//! The PBX REST client against the contract-faithful fake PBX over HTTPS.

use std::time::Duration;

use imfleet_controller::pbx::{
    ImAddresses, PbxClient, PbxError, PbxOptions, PbxTrust, Secret, parse_fingerprint,
};
use imfleet_tests::fake_pbx::FakePbx;

const PASSWORD: &str = "pbx-admin-password";

fn options(pbx: &FakePbx, trust: PbxTrust) -> PbxOptions {
    PbxOptions {
        base_url: pbx.url(),
        user: "admin".into(),
        password: Secret::new(PASSWORD),
        trust,
        max_retries: 3,
        first_backoff: Duration::from_millis(20),
    }
}

fn pinned(pbx: &FakePbx) -> PbxTrust {
    PbxTrust::Fingerprint(parse_fingerprint(&pbx.fingerprint).unwrap())
}

#[tokio::test]
async fn whitelist_is_created_once_then_reused_and_the_session_revoked() {
    let pbx = FakePbx::start(PASSWORD).await;
    let client = PbxClient::login(options(&pbx, pinned(&pbx))).await.unwrap();
    let ip = "192.0.2.25".parse().unwrap();
    let first = client
        .ensure_whitelisted(ip, "imfleet: PortSIP IM server im1")
        .await
        .unwrap();
    assert!(first.created);
    assert_eq!(first.cidr, "192.0.2.25/32");
    let again = client
        .ensure_whitelisted(ip, "imfleet: PortSIP IM server im1")
        .await
        .unwrap();
    assert_eq!(
        (again.created, again.id.as_str()),
        (false, first.id.as_str())
    );
    {
        let s = pbx.state.lock().unwrap();
        assert_eq!(s.filters_created, 1, "no duplicate entry");
        let f = &s.filters[0];
        assert_eq!(
            (f.target.as_str(), f.description.as_str()),
            ("ACCEPT", "imfleet: PortSIP IM server im1")
        );
        let expiry = time::OffsetDateTime::parse(
            &f.expire_at,
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        assert!(
            expiry > time::OffsetDateTime::now_utc() + time::Duration::days(3000),
            "long expiry"
        );
    }
    client.logout().await;
    assert_eq!(pbx.state.lock().unwrap().revoked, 1);
}

#[tokio::test]
async fn an_entry_made_in_the_portal_is_reused_and_a_blacklisting_is_reported() {
    let pbx = FakePbx::start(PASSWORD).await;
    // Fill more than one page of unrelated entries first.
    let portal_id = {
        let mut s = pbx.state.lock().unwrap();
        for i in 0..150 {
            s.add_filter(&format!("198.51.100.{}/32", i % 250), "ACCEPT");
        }
        s.add_filter("203.0.113.9/32", "DENY");
        s.add_filter("192.0.2.30/32", "ACCEPT")
    };
    let client = PbxClient::login(options(&pbx, pinned(&pbx))).await.unwrap();
    let reused = client
        .ensure_whitelisted("192.0.2.30".parse().unwrap(), "x")
        .await
        .unwrap();
    assert_eq!((reused.created, reused.id), (false, portal_id));
    let err = client
        .ensure_whitelisted("203.0.113.9".parse().unwrap(), "x")
        .await
        .unwrap_err();
    assert!(matches!(err, PbxError::Blacklisted { .. }), "{err}");
    assert_eq!(pbx.state.lock().unwrap().filters_created, 0);
}

#[tokio::test]
async fn expiring_access_tokens_are_refreshed() {
    let pbx = FakePbx::start(PASSWORD).await;
    // Tokens that live less than the client's refresh margin: refreshed before use.
    pbx.state.lock().unwrap().access_lifetime = Duration::from_secs(30);
    let client = PbxClient::login(options(&pbx, pinned(&pbx))).await.unwrap();
    let token = client.im_token().await.unwrap();
    assert_eq!(token.expose(), "pbx-im-token-0123456789abcdef");
    assert!(pbx.state.lock().unwrap().refreshes >= 1);

    // A token the server expired early: one 401, one refresh, then success.
    pbx.state.lock().unwrap().access_lifetime = Duration::from_secs(1800);
    let client = PbxClient::login(options(&pbx, pinned(&pbx))).await.unwrap();
    let before = pbx.state.lock().unwrap().refreshes;
    pbx.state.lock().unwrap().expire_all_access_tokens();
    let generated = client.generate_im_token().await.unwrap();
    assert_ne!(generated.expose(), token.expose());
    assert_eq!(pbx.state.lock().unwrap().refreshes, before + 1);
    assert_eq!(
        client.im_token().await.unwrap().expose(),
        generated.expose()
    );
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried_within_a_bound() {
    let pbx = FakePbx::start(PASSWORD).await;
    let client = PbxClient::login(options(&pbx, pinned(&pbx))).await.unwrap();
    let addresses =
        ImAddresses::from_ips("10.0.0.5".parse().unwrap(), "203.0.113.5".parse().unwrap());

    pbx.state.lock().unwrap().throttle_next = 2;
    pbx.state.lock().unwrap().retry_after_secs = Some(1);
    client.set_im_addresses(&addresses).await.unwrap();
    assert_eq!(client.im_addresses().await.unwrap(), addresses);

    pbx.state.lock().unwrap().fail_next = 3;
    assert_eq!(client.im_addresses().await.unwrap(), addresses);

    pbx.state.lock().unwrap().retry_after_secs = None;
    pbx.state.lock().unwrap().throttle_next = 100;
    let err = client.im_addresses().await.unwrap_err();
    assert!(
        matches!(err, PbxError::RateLimited { attempts: 4, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("whitelist"), "{err}");
    pbx.state.lock().unwrap().throttle_next = 0;
    pbx.state.lock().unwrap().fail_next = 100;
    let err = client.im_addresses().await.unwrap_err();
    assert!(
        matches!(
            err,
            PbxError::Server {
                status: 503,
                attempts: 4,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn bad_credentials_and_missing_rights_are_clear() {
    let pbx = FakePbx::start(PASSWORD).await;
    let mut wrong = options(&pbx, pinned(&pbx));
    wrong.password = Secret::new("not-the-password");
    let err = PbxClient::login(wrong).await.unwrap_err();
    assert!(matches!(err, PbxError::LoginRefused { .. }), "{err}");
    assert!(
        err.to_string().contains("invalid username or password"),
        "{err}"
    );
    assert!(!err.to_string().contains("not-the-password"));

    pbx.state.lock().unwrap().operator_user = Some(("operator".into(), "op-password".into()));
    let mut operator = options(&pbx, pinned(&pbx));
    operator.user = "operator".into();
    operator.password = Secret::new("op-password");
    let client = PbxClient::login(operator).await.unwrap();
    let err = client.im_token().await.unwrap_err();
    assert!(matches!(err, PbxError::Forbidden { .. }), "{err}");
    assert!(err.to_string().contains("administrator"), "{err}");
}

#[tokio::test]
async fn the_portal_certificate_is_verified() {
    let pbx = FakePbx::start(PASSWORD).await;
    // Pinned fingerprint and the portal's own certificate as CA both work.
    assert!(PbxClient::login(options(&pbx, pinned(&pbx))).await.is_ok());
    assert!(
        PbxClient::login(options(&pbx, PbxTrust::CaPem(pbx.cert_pem.clone())))
            .await
            .is_ok()
    );
    // A wrong pin, or the system trust store, refuse the self-signed portal.
    let err = PbxClient::login(options(&pbx, PbxTrust::Fingerprint([7; 32])))
        .await
        .unwrap_err();
    assert!(matches!(err, PbxError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("instead of the pinned"), "{err}");
    assert!(
        PbxClient::login(options(&pbx, PbxTrust::System))
            .await
            .is_err()
    );
    // Insecure works (and warns), for labs only.
    assert!(
        PbxClient::login(options(&pbx, PbxTrust::Insecure))
            .await
            .is_ok()
    );
    assert_eq!(pbx.state.lock().unwrap().logins, 3);
}

#[tokio::test]
async fn a_redirected_login_is_not_followed_and_the_password_goes_nowhere_else() {
    let pbx = FakePbx::start(PASSWORD).await;
    // Where a hijacked portal would send the password form: plain HTTP and
    // HTTPS elsewhere.
    let catcher = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    catcher.set_nonblocking(true).unwrap();
    let port = catcher.local_addr().unwrap().port();
    for target in [
        format!("http://127.0.0.1:{port}/steal"),
        format!("https://127.0.0.1:{port}/steal"),
    ] {
        pbx.state.lock().unwrap().redirect_login_to = Some(target.clone());
        let err = PbxClient::login(options(&pbx, pinned(&pbx)))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("redirect"), "{target}: {text}");
        // reqwest follows before it returns: nothing connected, nothing will.
        assert_eq!(
            catcher.accept().unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "{target}: the login was re-sent"
        );
    }
    assert_eq!(pbx.state.lock().unwrap().logins, 0);
}
