//! Mutual TLS between controller and agent refuses every identity it should:
//! the real agent server in-process, the controller's real client code.

use imfleet_agent::server::AgentFacts;
use imfleet_certs::{CONTROLLER_LIFETIME, CertificateAuthority, IssuedIdentity, Validity};
use imfleet_controller::agent_client::{Agent, AgentAddress, AgentError};
use imfleet_controller::state::ClientIdentity;
use imfleet_proto::agent::v1::PingRequest;
use imfleet_proto::agent::v1::agent_client::AgentClient;
use imfleet_tests::inproc::{RunningAgent, client, controller};
use imfleet_tests::pki::{agent_identity_now, custom_identity};
use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};

async fn start_agent(ca: &CertificateAuthority, sans: &[&str]) -> RunningAgent {
    start_agent_with(ca, agent_identity_now(ca, sans), |_, _| {}).await
}

async fn start_agent_with(
    ca: &CertificateAuthority,
    issued: IssuedIdentity,
    lie: impl FnOnce(&mut AgentFacts, &mut imfleet_certs::CertificateInfo),
) -> RunningAgent {
    imfleet_tests::inproc::start_agent(ca, issued, None, lie).await
}

fn controller_identity(ca: &CertificateAuthority, validity: Validity) -> IssuedIdentity {
    ca.issue_controller("controller@test", validity).unwrap()
}

/// Connect and ping; TLS 1.3 may report a refused client certificate only on
/// the first request, so both steps count.
async fn call(identity: &ClientIdentity, address: &AgentAddress) -> Result<u64, AgentError> {
    let agent = Agent::connect(identity, address).await?;
    Ok(agent.ping().await?.reply.uptime_seconds + 1)
}

fn refusal_text(err: &AgentError) -> String {
    imfleet_controller::error_chain(err).to_lowercase()
}

#[tokio::test]
async fn the_controller_identity_is_accepted() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    let me = controller(&ca);
    let agent_client = Agent::connect(&me, &agent.address("127.0.0.1"))
        .await
        .unwrap();
    let pong = agent_client.ping().await.unwrap();
    assert_eq!(pong.reply.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        pong.reply.protocol_revision,
        imfleet_proto::PROTOCOL_REVISION
    );
}

#[tokio::test]
async fn a_client_without_certificate_is_refused() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(ca.cert_pem()))
        .domain_name("127.0.0.1");
    let result = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", agent.addr))?
            .tls_config(tls)?
            .connect()
            .await?;
        let reply = AgentClient::new(channel)
            .ping(PingRequest { nonce: 1 })
            .await?;
        Ok::<_, Box<dyn std::error::Error>>(reply)
    }
    .await;
    let err = result.expect_err("an anonymous client got an answer");
    let text = format!("{err:?}").to_lowercase();
    assert!(text.contains("certificaterequired"), "{text}");
}

#[tokio::test]
async fn a_controller_certificate_from_a_foreign_ca_is_refused() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let foreign = CertificateAuthority::generate("foreign CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    let me = client(
        &ca,
        &controller_identity(&foreign, Validity::starting_now(CONTROLLER_LIFETIME)),
    );
    let err = call(&me, &agent.address("127.0.0.1")).await.unwrap_err();
    assert!(matches!(err, AgentError::Tls { .. }), "{err}");
    assert!(refusal_text(&err).contains("alert: unknownca"), "{err}");
    assert!(
        err.to_string()
            .contains("does not trust this controller's CA"),
        "{err}"
    );
}

#[tokio::test]
async fn an_expired_controller_certificate_is_refused() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    let now = time::OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - time::Duration::days(30),
        not_after: now - time::Duration::days(1),
    };
    let me = client(&ca, &controller_identity(&ca, expired));
    let err = call(&me, &agent.address("127.0.0.1")).await.unwrap_err();
    assert!(matches!(err, AgentError::Tls { .. }), "{err}");
    assert!(
        refusal_text(&err).contains("alert: certificateexpired"),
        "{err}"
    );
    assert!(err.to_string().contains("controller init"), "{err}");
}

#[tokio::test]
async fn an_expired_agent_certificate_is_refused_naming_the_fix() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let expired = Validity {
        not_before: now - time::Duration::days(91),
        not_after: now - time::Duration::days(1),
    };
    let issued = imfleet_tests::pki::agent_identity(&ca, &["127.0.0.1"], expired);
    let agent = start_agent_with(&ca, issued, |_, _| {}).await;
    let err = call(&controller(&ca), &agent.address("127.0.0.1"))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Tls { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("certificate has expired") && text.contains("controller bootstrap"),
        "{text}"
    );
}

#[tokio::test]
async fn an_agent_certificate_cannot_act_as_the_controller() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    // A genuine agent identity from the same CA, presented as a client.
    let other_agent = agent_identity_now(&ca, &["127.0.0.5"]);
    let me = client(&ca, &other_agent);
    let err = call(&me, &agent.address("127.0.0.1")).await.unwrap_err();
    // Its EKU is serverAuth only, so the agent's TLS stack rejects it.
    assert!(matches!(err, AgentError::Tls { .. }), "{err}");
    assert!(
        refusal_text(&err).contains("alert: unsupportedcertificate"),
        "{err}"
    );
}

#[tokio::test]
async fn the_controller_refuses_an_agent_whose_san_is_not_the_dialled_address() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    // The agent listens on 127.0.0.1 but its certificate names 127.0.0.9.
    let agent = start_agent(&ca, &["127.0.0.9"]).await;
    let me = controller(&ca);
    let err = call(&me, &agent.address("127.0.0.1")).await.unwrap_err();
    assert!(matches!(err, AgentError::Tls { .. }), "{err}");
    assert!(refusal_text(&err).contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn the_controller_refuses_an_agent_from_a_foreign_ca() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let foreign = CertificateAuthority::generate("impostor CA").unwrap();
    let impostor = start_agent(&foreign, &["127.0.0.1"]).await;
    let me = controller(&ca);
    let err = call(&me, &impostor.address("127.0.0.1")).await.unwrap_err();
    assert!(matches!(err, AgentError::Tls { .. }), "{err}");
    assert!(refusal_text(&err).contains("unknownissuer"), "{err}");
}

#[tokio::test]
async fn an_upload_whose_bytes_do_not_match_its_sha256_is_refused() {
    use imfleet_proto::agent::v1::{ImageChunk, ImageUploadHeader};
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    let me = controller(&ca);
    let connected = Agent::connect(&me, &agent.address("127.0.0.1"))
        .await
        .unwrap();
    let data = b"pretend image bytes".to_vec();
    let lying = ImageChunk {
        header: Some(ImageUploadHeader {
            name: "pbx.tar".into(),
            size: data.len() as u64,
            sha256: "00".repeat(32),
        }),
        data,
    };
    let err = connected
        .load_image(tokio_stream::iter(vec![lying]))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("upload of pbx.tar is corrupt"), "{text}");
    assert!(text.contains("nothing was loaded"), "{text}");
}

#[tokio::test]
async fn a_controller_certificate_without_an_eku_is_refused() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    // TLS stacks accept a client certificate that has no EKU at all.
    let no_eku = custom_identity(&ca, &["controller"], vec![], &[]);
    let err = call(&client(&ca, &no_eku), &agent.address("127.0.0.1"))
        .await
        .unwrap_err();
    assert!(matches!(err, AgentError::Refused { .. }), "{err}");
    assert!(err.to_string().contains("clientAuth"), "{err}");
    // The same shape with the EKU is accepted: the refusal is the EKU's.
    let with_eku = custom_identity(&ca, &["controller"], vec![ClientAuth], &[]);
    call(&client(&ca, &with_eku), &agent.address("127.0.0.1"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_certificate_naming_two_roles_is_refused() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    for units in [["controller", "agent"], ["agent", "controller"]] {
        let two = custom_identity(&ca, &units, vec![ClientAuth], &[]);
        let err = call(&client(&ca, &two), &agent.address("127.0.0.1"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, AgentError::Refused { .. }),
            "{units:?}: {err}"
        );
        assert!(err.to_string().contains("exactly one"), "{err}");
    }
}

#[tokio::test]
async fn the_controller_refuses_a_server_certificate_without_the_agent_role() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let me = controller(&ca);
    // Chains to the CA and names the address, but claims another role.
    for units in [&["controller"][..], &[][..], &["agent", "controller"][..]] {
        let impostor = custom_identity(&ca, units, vec![ServerAuth], &["127.0.0.1"]);
        let agent = start_agent_with(&ca, impostor, |_, _| {}).await;
        let err = call(&me, &agent.address("127.0.0.1")).await.unwrap_err();
        assert!(matches!(err, AgentError::Tls { .. }), "{units:?}: {err}");
        assert!(refusal_text(&err).contains("role"), "{err}");
    }
}

#[tokio::test]
async fn certificate_expiry_is_read_from_the_handshake_not_the_reply() {
    let ca = CertificateAuthority::generate("CA").unwrap();
    let issued = agent_identity_now(&ca, &["127.0.0.1"]);
    let real = imfleet_certs::inspect_pem(&issued.cert_pem)
        .unwrap()
        .not_after
        .unix_timestamp();
    let agent = start_agent_with(&ca, issued, |_, claimed| {
        claimed.not_after = time::OffsetDateTime::from_unix_timestamp(4_102_444_800).unwrap(); // "valid until 2100"
    })
    .await;
    let me = controller(&ca);
    let pong = Agent::connect(&me, &agent.address("127.0.0.1"))
        .await
        .unwrap()
        .ping()
        .await
        .unwrap();
    assert_eq!(pong.reply.certificate_not_after, 4_102_444_800);
    assert_eq!(pong.certificate_not_after, real);
}

/// CPU time (user + system, clock ticks) this process has used.
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_neither_spin_the_agent_nor_delay_the_controller() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    // The default soft limit of a service: 1,024 descriptors.
    let (_, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    nix::sys::resource::setrlimit(
        nix::sys::resource::Resource::RLIMIT_NOFILE,
        1024.min(hard),
        hard,
    )
    .unwrap();
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    // 1,100 clients that connect and never say a word, from another process
    // and another address (one source may start only so many handshakes)
    // (their descriptors must not count against the agent's).
    let script = format!(
        "import resource, socket, sys\n\
         resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))\n\
         held = [socket.create_connection(('127.0.0.1', {port}), timeout=30, source_address=('127.0.0.3', 0)) for _ in range(1100)]\n\
         print('ready', flush=True)\n\
         sys.stdin.read()\n",
        port = agent.addr.port()
    );
    let mut idle = Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(idle.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");

    let me = controller(&ca);
    let before = cpu_ticks();
    let measured = std::time::Instant::now();
    for _ in 0..5 {
        let started = std::time::Instant::now();
        call(&me, &agent.address("127.0.0.1")).await.unwrap();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "a ping took {:?} behind idle connections",
            started.elapsed()
        );
    }
    // Let the agent sit with the idle connections: a spinning accept loop
    // burns a whole core (100 ticks a second) here.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let ticks = cpu_ticks() - before;
    let seconds = measured.elapsed().as_secs_f64();
    let _ = idle.kill();
    let _ = idle.wait();
    assert!(
        (ticks as f64) < 25.0 * seconds,
        "the agent used {ticks} ticks of CPU in {seconds:.1} s with idle clients connected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_flood_from_another_address_never_evicts_the_controller() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let ca = CertificateAuthority::generate("CA").unwrap();
    let agent = start_agent(&ca, &["127.0.0.1"]).await;
    // 300 sockets from 127.0.0.2 that say nothing and reconnect the moment
    // the agent drops one: more than every handshake slot there is.
    let script = format!(
        "import select, socket, sys\n\
         def connect():\n\
         \x20   s = socket.socket()\n\
         \x20   s.bind(('127.0.0.2', 0))\n\
         \x20   s.connect(('127.0.0.1', {port}))\n\
         \x20   return s\n\
         held = [connect() for _ in range(300)]\n\
         print('ready', flush=True)\n\
         reconnects = 0\n\
         while not select.select([sys.stdin], [], [], 0)[0]:\n\
         \x20   dropped, _, _ = select.select(held, [], [], 0.05)\n\
         \x20   for s in dropped:\n\
         \x20       held.remove(s)\n\
         \x20       s.close()\n\
         \x20       held.append(connect())\n\
         \x20       reconnects += 1\n\
         print(reconnects, flush=True)\n",
        port = agent.addr.port()
    );
    let mut flood = Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(flood.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");

    let me = controller(&ca);
    let mut failed = Vec::new();
    // 20 pings over 3 s at least (a controller's pace, well inside its own
    // source's handshake rate): long enough for the flood to be dropped and
    // come back many times, however loaded the machine is.
    let pings = 20;
    for _ in 0..pings {
        if let Err(e) = call(&me, &agent.address("127.0.0.1")).await {
            failed.push(imfleet_controller::error_chain(&e));
        }
        tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    }
    use std::io::Write;
    flood.stdin.take().unwrap().write_all(b"stop\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let _ = flood.wait();
    let reconnects: u64 = line.trim().parse().unwrap();
    assert!(
        reconnects > 100,
        "the flood was not evicting: {reconnects} reconnects"
    );
    assert!(
        failed.is_empty(),
        "{} of {pings} pings failed: {failed:?}",
        failed.len()
    );
}
