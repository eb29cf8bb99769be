//! `controller deploy` and the lifecycle commands against the real Docker
//! Engine, with the project's stand-ins for PortSIP's images.

use imfleet_tests::deploy::{
    DB_IMAGE, IMAGE, NEVER_HEALTHY_DEPLOY, Setup, TOKEN, containers, docker, http_status, owner,
    wait_until_healthy,
};
use imfleet_tests::{Controller, ImSlot, TestHost, existing_im_containers};

#[test]
fn deploy_to_healthy_then_stop_start_restart_rm_and_purge() {
    let _slot = ImSlot::take();
    let s = Setup::new();
    let run = s.deploy(&["--json"]);
    assert!(run.success(), "{run:#?}");
    // The token never shows up in what the controller prints.
    assert!(!run.stdout.contains(TOKEN) && !run.stderr.contains(TOKEN));
    let report = run.json();
    assert_eq!(report["status"]["healthy"], true, "{report}");
    let names: Vec<&str> = report["status"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    // The one-shot init container ran and is gone.
    assert_eq!(
        names,
        [
            "portsip.database",
            "portsip.instantmessage",
            "portsip.webserver"
        ]
    );
    // --force overrode exactly the failed checks; this test host is not Ubuntu 24.04.
    let overridden = report["overridden"].as_array().unwrap();
    assert!(
        overridden.iter().all(|c| c["verdict"] == "fail"),
        "{report}"
    );
    let release = imfleet_proto::model::os_release::read_os_release();
    if (release.id.as_str(), release.version_id.as_str()) != ("ubuntu", "24.04") {
        assert!(
            overridden.iter().any(|c| c["id"] == "os.release"),
            "{report}"
        );
    }
    assert_eq!(report["deployment"]["image"], IMAGE);

    // Data layout with PortSIP's ownership, and a private generated password.
    let data = s.data_path();
    assert_eq!(owner(&data.join("im-data")).0, 888);
    assert_eq!(owner(&data.join("im-postgresql")), (999, 999, 0o700));
    assert_eq!(owner(&data.join("im-data/system.ini")), (888, 888, 0o600));
    let ini = std::fs::read_to_string(data.join("im-data/system.ini")).unwrap();
    let password = ini
        .lines()
        .find_map(|l| l.strip_prefix("superuser_password = "))
        .unwrap();
    assert_eq!(password.len(), 20);
    assert!(!run.stdout.contains(password) && !run.stderr.contains(password));
    assert!(data.join("im-data/VERSION").exists(), "initdt ran");
    assert!(
        data.join("im-data/im/fake-im.state").exists(),
        "the IM wrote its data dir"
    );
    assert_eq!(http_status("/svr_stats"), Some(200));
    assert!(std::net::TcpStream::connect(("127.0.0.1", 8887)).is_ok());

    // logs of one container, and status of every host.
    let logs = s.controller.run(&[
        "logs",
        &s.address(),
        "-c",
        "portsip.instantmessage",
        "-n",
        "5",
    ]);
    assert!(logs.success(), "{logs:#?}");
    assert!(
        logs.stderr
            .contains("portsip.instantmessage: im: serving clients on 8887"),
        "{logs:#?}"
    );
    // The IM logs its token; the agent redacts it from what it serves.
    assert!(
        logs.stderr.contains("using token [redacted]") && !logs.stderr.contains(TOKEN),
        "{logs:#?}"
    );
    let json_logs = s
        .controller
        .run(&["logs", &s.address(), "--json", "-n", "5"]);
    let first: serde_json::Value =
        serde_json::from_str(json_logs.stdout.lines().next().unwrap_or("null")).unwrap();
    assert!(
        first["container"].as_str().unwrap().starts_with("portsip."),
        "{json_logs:#?}"
    );
    assert!(first["line"].is_string() && first["stream"].is_string());
    let all = s.controller.run(&["status", "--all"]);
    assert!(
        all.success() && all.stdout.contains("portsip.webserver"),
        "{all:#?}"
    );

    // stop: everything stopped, idempotent.
    for _ in 0..2 {
        let stop = s
            .controller
            .run(&["stop", "--grace", "5", "--json", &s.address()]);
        assert!(stop.success(), "{stop:#?}");
        let status = s.status();
        assert_eq!(status[0]["healthy"], false);
        assert!(
            status[0]["status"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["state"] == "exited")
        );
    }
    assert_eq!(http_status("/svr_stats"), None);
    // start, restart: healthy again.
    assert!(s.controller.run(&["start", &s.address()]).success());
    wait_until_healthy(&s);
    let before = s.status()[0]["status"]["containers"][1]["started_at"]
        .as_i64()
        .unwrap();
    assert!(
        s.controller
            .run(&["restart", "--grace", "5", &s.address()])
            .success()
    );
    let after = wait_until_healthy(&s)[0]["status"]["containers"][1]["started_at"]
        .as_i64()
        .unwrap();
    assert!(after >= before);

    // rm keeps data and needs confirmation; rm again is harmless.
    let refused = s.controller.run(&["rm", &s.address()]);
    assert_eq!(refused.status, Some(1));
    assert!(refused.stderr.contains("--yes"), "{}", refused.stderr);
    assert!(!existing_im_containers().is_empty());
    for _ in 0..2 {
        assert!(
            s.controller
                .run(&["rm", "--yes", "--grace", "5", &s.address()])
                .success()
        );
        assert!(
            existing_im_containers().is_empty(),
            "{:?}",
            existing_im_containers()
        );
    }
    assert!(data.join("im-data/system.ini").exists());
    assert_eq!(s.status()[0]["deployment"], serde_json::Value::Null);

    // A redeploy reuses the kept data (same database password); --purge deletes it.
    assert!(s.deploy(&[]).success());
    let ini_again = std::fs::read_to_string(data.join("im-data/system.ini")).unwrap();
    assert!(
        ini_again.contains(password),
        "the database password was kept"
    );
    assert!(
        s.controller
            .run(&["rm", "--yes", "--purge", "--grace", "5", &s.address()])
            .success()
    );
    assert!(!data.join("im-data").exists() && !data.join("im-postgresql").exists());
}

#[test]
fn an_im_that_never_gets_healthy_fails_with_its_logs_and_the_previous_deployment_returns() {
    let _slot = ImSlot::take();
    let s = Setup::new();

    // On a fresh host: the failure leaves nothing running from it.
    let run = s.deploy(NEVER_HEALTHY_DEPLOY);
    assert_eq!(run.status, Some(1), "{run:#?}");
    assert!(
        run.stderr
            .contains("portsip.instantmessage did not become ready within 8 s"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("im: serving clients on 8887"),
        "the IM's own log lines are shown: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains("No new containers were left behind"),
        "{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains(TOKEN),
        "the token must be redacted: {}",
        run.stderr
    );
    assert!(
        existing_im_containers().is_empty(),
        "{:?}",
        existing_im_containers()
    );
    assert_eq!(s.status()[0]["deployment"], serde_json::Value::Null);

    // Over a healthy deployment: it fails the same way and the old one is back.
    assert!(s.deploy(&[]).success());
    let good = s.status();
    let run = s.deploy(NEVER_HEALTHY_DEPLOY);
    assert_eq!(run.status, Some(1), "{run:#?}");
    assert!(
        run.stderr.contains("previous deployment was restored"),
        "{}",
        run.stderr
    );
    let restored = wait_until_healthy(&s);
    assert_eq!(containers(&restored), containers(&good));
    assert!(
        containers(&restored)
            .iter()
            .all(|(_, image, _)| image != "imfleet-test/pbx:22-never-healthy")
    );
    assert_eq!(
        restored[0]["deployment"]["image"], IMAGE,
        "the record still names what runs"
    );
    assert!(
        existing_im_containers()
            .iter()
            .all(|c| !c.contains(".previous"))
    );
}

#[test]
fn redeploy_replaces_the_running_deployment_with_the_new_configuration() {
    let _slot = ImSlot::take();
    let s = Setup::new();
    assert!(s.deploy(&[]).success());
    let first = s.status();
    let first_hash = first[0]["deployment"]["config_hash"]
        .as_str()
        .unwrap()
        .to_owned();

    // A new token (as the HA upgrade guide asks for) is a new configuration.
    s.write_token("imtok-fedcba9876543210fedcba98765");
    let run = s.deploy(&["--json"]);
    let report = run.json();
    assert_eq!(report["status"]["healthy"], true);
    let second = s.status();
    assert_ne!(
        second[0]["deployment"]["config_hash"].as_str().unwrap(),
        first_hash
    );
    assert_eq!(
        second[0]["status"]["config_hash"],
        second[0]["deployment"]["config_hash"]
    );
    assert!(
        existing_im_containers()
            .iter()
            .all(|c| !c.contains(".previous"))
    );
    assert_eq!(http_status("/svr_stats"), Some(200));
}

#[test]
fn bad_input_is_refused_before_anything_changes_on_the_host() {
    let _slot = ImSlot::take();
    let s = Setup::new();
    let untouched = |what: &str| {
        assert!(
            existing_im_containers().is_empty(),
            "{what}: {:?}",
            existing_im_containers()
        );
        assert!(!s.data_path().exists(), "{what}: data path created");
    };

    let bad_ip = s.controller.run(&[
        "deploy",
        &s.address(),
        "-a",
        "10.0.0.256",
        "-A",
        &s.address(),
        "--pbx",
        "127.0.0.1",
    ]);
    assert_eq!(bad_ip.status, Some(2));
    assert!(
        bad_ip.stderr.contains("invalid value '10.0.0.256'"),
        "{}",
        bad_ip.stderr
    );
    untouched("bad ip");

    s.write_token("");
    let empty = s.deploy(&[]);
    assert_eq!(empty.status, Some(1));
    assert!(
        empty.stderr.contains("IM token is empty"),
        "{}",
        empty.stderr
    );
    untouched("empty token");
    s.write_token(TOKEN);

    // A missing -f directory: preflight fails and nothing is done...
    let missing = s.storage_dir().display().to_string();
    let missing = missing.as_str();
    let run = s.deploy_with(&["-f", missing], false);
    assert_eq!(run.status, Some(1), "{run:#?}");
    assert!(
        run.stderr.contains("preflight failed") && run.stderr.contains("storage.dir"),
        "{}",
        run.stderr
    );
    assert!(
        run.stdout.contains(&format!("mkdir -p {missing}")),
        "{}",
        run.stdout
    );
    untouched("missing -f");
    // ...and --force does not get past it either: the agent refuses it first.
    let forced = s.deploy(&["-f", missing]);
    assert_eq!(forced.status, Some(1), "{forced:#?}");
    assert!(
        forced.stderr.contains(&format!("{missing} does not exist")),
        "{}",
        forced.stderr
    );
    untouched("missing -f with --force");

    // A container of that name that imfleet does not manage is left alone.
    let foreign = docker(&[
        "create",
        "--name",
        "portsip.webserver",
        IMAGE,
        "run_im_websrv.sh",
    ]);
    assert!(foreign.status.success(), "{foreign:?}");
    let run = s.deploy(&[]);
    assert_eq!(run.status, Some(1), "{run:#?}");
    assert!(
        run.stderr
            .contains("`portsip.webserver` exists and is not part of deployment"),
        "{}",
        run.stderr
    );
    assert_eq!(
        existing_im_containers(),
        vec!["portsip.webserver created".to_owned()]
    );
    assert!(!s.data_path().exists());
    assert!(docker(&["rm", "portsip.webserver"]).status.success());

    // An image the host does not have and cannot pull.
    let absent = s.deploy(&["--image", "imfleet-test/absent:1"]);
    assert_eq!(absent.status, Some(1));
    assert!(
        absent
            .stderr
            .contains("imfleet-test/absent:1 is not on the host"),
        "{}",
        absent.stderr
    );
    untouched("absent image");
}

#[test]
fn an_image_archive_is_streamed_verified_and_loaded() {
    let _slot = ImSlot::take();
    let s = Setup::new();
    // An image the engine does not have, available only as an archive.
    let tag = "imfleet-test/pbx:22-archive";
    let archive = s.work.path().join("pbx.tar");
    assert!(docker(&["tag", IMAGE, tag]).status.success());
    assert!(
        docker(&["save", "-o", archive.to_str().unwrap(), tag])
            .status
            .success()
    );
    assert!(docker(&["rmi", tag]).status.success());

    // A corrupt archive is refused and changes nothing.
    let corrupt = s.work.path().join("corrupt.tar");
    std::fs::write(&corrupt, b"this is not a tar archive at all").unwrap();
    let run = s.deploy(&["--image", tag, "--image-file", corrupt.to_str().unwrap()]);
    assert_eq!(run.status, Some(1), "{run:#?}");
    assert!(
        run.stderr
            .contains("corrupt.tar is not a valid image archive"),
        "{}",
        run.stderr
    );
    assert!(existing_im_containers().is_empty());
    assert!(!s.data_path().exists());
    let spool = s.host.opt_imfleet().join("spool");
    let spooled = || std::fs::read_dir(&spool).unwrap().count();
    assert_eq!(spooled(), 0, "no spool file left after a failure");
    // Without the archive the image cannot be had.
    let run = s.deploy(&["--image", tag]);
    assert!(
        run.stderr.contains("load it with --image-file"),
        "{}",
        run.stderr
    );

    let run = s.deploy(&[
        "--image",
        tag,
        "--image-file",
        archive.to_str().unwrap(),
        "--json",
    ]);
    let report = run.json();
    assert_eq!(report["status"]["healthy"], true);
    assert!(
        docker(&["image", "inspect", tag]).status.success(),
        "the archive was loaded"
    );
    assert_eq!(spooled(), 0, "no spool file left after success");
    let _ = docker(&["rmi", "-f", tag]);

    let missing = s.deploy(&["--image-file", "/nonexistent/pbx.tar"]);
    assert_eq!(missing.status, Some(1));
    assert!(
        missing.stderr.contains("--image-file /nonexistent/pbx.tar"),
        "{}",
        missing.stderr
    );
}

#[test]
fn deploy_bootstraps_a_host_that_has_no_agent_yet() {
    let _slot = ImSlot::take();
    let host = TestHost::start();
    let controller = Controller::new();
    let work = tempfile::tempdir().unwrap();
    let token = work.path().join("im.token");
    std::fs::write(&token, TOKEN).unwrap();
    let address = host.address().to_string();
    let data = work.path().join("portsip").display().to_string();
    let mut args: Vec<String> = [
        "deploy",
        "-a",
        &address,
        "-A",
        &address,
        "--pbx",
        "127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(host.ssh_args(imfleet_tests::SshUser::Sudoer));
    args.extend(host.agent_args());
    for a in [
        "--token-file",
        token.to_str().unwrap(),
        "--image",
        IMAGE,
        "--db-image",
        DB_IMAGE,
        "--data-path",
        &data,
        "--users",
        "5000",
        "--force",
        "--stop-grace",
        "5",
        "--json",
        &address,
    ] {
        args.push(a.to_owned());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let report = controller.run(&refs).json();
    assert_eq!(report["status"]["healthy"], true, "{report}");
    let hosts = controller.run(&["hosts", "--json"]).json();
    assert_eq!(hosts[0]["host"], address.as_str());
    assert_eq!(hosts[0]["reachable"], true);
    assert!(
        controller
            .run(&["rm", "--yes", "--grace", "5", &address])
            .success()
    );
}

/// Runs the blocking `f` off the async runtime that serves the fake PBX.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_whitelists_fetches_the_token_and_registers_on_the_pbx() {
    use imfleet_tests::fake_pbx::FakePbx;
    let pbx = FakePbx::start("pbx-admin-password").await;
    let s = std::sync::Arc::new(blocking(|| (ImSlot::take(), Setup::new())).await);
    let password = s.1.work.path().join("pbx.password");
    std::fs::write(&password, "pbx-admin-password\n").unwrap();
    // No token file this time: the token comes from the PBX.
    std::fs::remove_file(s.1.token_file()).unwrap();
    let args: Vec<String> = [
        "--pbx-api",
        &pbx.url(),
        "--pbx-password-file",
        password.to_str().unwrap(),
        "--pbx-fingerprint",
        &pbx.fingerprint,
        "--json",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    let run_deploy = |s: std::sync::Arc<(ImSlot, Setup)>, args: Vec<String>| async move {
        blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            s.1.deploy(&args)
        })
        .await
    };
    let run = run_deploy(s.clone(), args.clone()).await;
    assert!(run.success(), "{run:#?}");
    assert!(
        !run.stdout.contains("pbx-admin-password") && !run.stderr.contains("pbx-admin-password")
    );
    assert!(
        !run.stdout.contains("pbx-im-token-0123456789abcdef"),
        "the token is never printed"
    );
    // The password file was written 0644: the operator is told to fix that.
    assert!(
        run.stderr
            .contains("readable by others (mode 644); chmod 600 it"),
        "{}",
        run.stderr
    );
    let report = run.json();
    assert_eq!(report["status"]["healthy"], true);
    assert_eq!(report["pbx"]["token_from_pbx"], true);
    let address = s.1.address();
    assert_eq!(
        report["pbx"]["whitelisted"][0]["cidr"],
        format!("{address}/32")
    );
    {
        let state = pbx.state.lock().unwrap();
        assert_eq!(
            state.filters_created, 1,
            "private and public are the same address here"
        );
        assert!(state.filters[0].description.contains("imfleet"));
        assert_eq!(state.im["private_ipv4"], address.as_str());
        assert_eq!(state.im["public_ipv4"], address.as_str());
        assert_eq!(
            (state.logins, state.revoked),
            (1, 1),
            "one session, revoked at the end"
        );
    }
    // The IM got the PBX's token (the stand-in refuses a bad one).
    let run = run_deploy(s.clone(), args.clone()).await;
    assert!(run.success(), "{run:#?}");
    assert_eq!(
        pbx.state.lock().unwrap().filters_created,
        1,
        "the entry is reused, not duplicated"
    );

    // An upgrade-style redeploy with a new token: the PBX generates it, the
    // IM runs with it (a new configuration).
    let hash_before = s.1.status()[0]["deployment"]["config_hash"].clone();
    let mut with_new = args.clone();
    with_new.push("--new-im-token".into());
    let run = run_deploy(s.clone(), with_new).await;
    assert!(run.success(), "{run:#?}");
    assert_ne!(
        pbx.state.lock().unwrap().im_token,
        "pbx-im-token-0123456789abcdef"
    );
    assert_ne!(s.1.status()[0]["deployment"]["config_hash"], hash_before);

    // A PBX that does not take the addresses: deploy does not claim success.
    {
        let mut state = pbx.state.lock().unwrap();
        state.ignore_im_updates = true;
        state.im["private_ipv4"] = serde_json::json!("192.0.2.99");
    }
    let run = run_deploy(s.clone(), args.clone()).await;
    assert_eq!(run.status, Some(1), "{run:#?}");
    assert!(
        run.stderr.contains("the PBX shows IM addresses"),
        "{}",
        run.stderr
    );
    pbx.state.lock().unwrap().ignore_im_updates = false;

    // A wrong PBX password fails before the host is touched.
    std::fs::write(&password, "wrong\n").unwrap();
    let run = run_deploy(s.clone(), args).await;
    assert_eq!(run.status, Some(1));
    assert!(
        run.stderr.contains("refused the login of `admin`"),
        "{}",
        run.stderr
    );

    // Without PBX access or a token, a non-interactive deploy prints the portal steps.
    let s2 = s.clone();
    let run = blocking(move || s2.1.deploy(&[])).await;
    assert_eq!(run.status, Some(1));
    assert!(
        run.stderr.contains(&format!("whitelist {address}")),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("Generate Token"), "{}", run.stderr);
}
