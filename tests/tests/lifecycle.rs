//! One IM host's whole life with one SSH session: bootstrapped and deployed,
//! its agent upgraded to a newer build (bumped version and protocol
//! revision), its certificate renewed, the fleet CA rotated, then the IM
//! upgraded by a rolling upgrade. The host's sshd accepts exactly one
//! session (its own log says so), and the IM containers are not restarted
//! by anything but the IM upgrade.

use imfleet_tests::bin;
use imfleet_tests::deploy::{DB_IMAGE, IMAGE};
use imfleet_tests::fleet::{Fleet, NEXT_IMAGE};

#[test]
fn one_host_lives_through_every_change_with_one_ssh_session() {
    let fleet = Fleet::deployed_with(1, &[IMAGE, DB_IMAGE, NEXT_IMAGE]);
    let host = &fleet.hosts[0];
    let name = fleet.names()[0].clone();
    let controller = &fleet.controller;
    let started = fleet.im_started_at(0);
    assert!(!started.is_empty());
    let untouched = |step: &str| {
        assert_eq!(
            fleet.im_started_at(0),
            started,
            "the IM restarted during {step}"
        );
        assert_eq!(fleet.running(0), (IMAGE.to_owned(), true), "after {step}");
    };

    // The agent, upgraded over mTLS to a build speaking a newer protocol.
    let next = bin("agent-next");
    let upgraded = controller
        .run(&[
            "agents",
            "upgrade",
            &name,
            "--agent-binary",
            next.to_str().unwrap(),
            "--json",
        ])
        .json();
    assert_eq!(upgraded[0]["result"]["outcome"], "upgraded", "{upgraded:#}");
    let pong = controller.run(&["ping", &name, "--json"]).json();
    assert_eq!(
        pong[0]["protocol_revision"].as_u64(),
        Some(u64::from(imfleet_proto::PROTOCOL_REVISION) + 1)
    );
    untouched("the agent upgrade");

    // Its certificate, renewed over mTLS.
    let renewed = controller.run(&["certs", "renew", &name, "--json"]).json();
    assert_eq!(renewed[0]["ok"], true, "{renewed:#}\n{}", host.agent_log());
    untouched("the renewal");

    // The fleet CA, rotated.
    let rotated = controller.run(&["ca", "rotate", "--json"]).json();
    assert_eq!(rotated["finished"], true, "{rotated:#}");
    untouched("the CA rotation");
    let certs = controller.run(&["certs", "--json"]).json();
    assert_eq!(certs["ca"]["sha256_fingerprint"], rotated["new_ca"]);

    // The IM, upgraded by a rolling upgrade under the new CA.
    let run = fleet.upgrade(&["--image", NEXT_IMAGE]);
    assert!(run.success(), "{run:#?}");
    assert_eq!(fleet.running(0), (NEXT_IMAGE.to_owned(), true));
    assert_ne!(fleet.im_started_at(0), started);

    // One SSH session in the host's whole life: bootstrap's.
    let sshd = host.sshd_log();
    assert_eq!(sshd.matches("Accepted publickey").count(), 1, "{sshd}");
}
