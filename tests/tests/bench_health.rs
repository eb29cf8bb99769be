//! Benchmarks of the health stream (run by `bench/health-stream`, never by
//! the test suite: they are `#[ignore]`d and take minutes). They print
//! `bench:` lines with the figures and the targets of issue 11.

use std::time::{Duration, Instant};

use imfleet_tests::daemon::Daemon;
use imfleet_tests::{Controller, bootstrapped_host, rss};

/// User plus system CPU seconds a process used so far.
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime), counted from the state at index 0 = field 3.
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

#[test]
#[ignore = "benchmark: bench/health-stream"]
fn agent_footprint_idle_and_streaming_at_one_second() {
    let (host, controller) = bootstrapped_host();
    let pid = host.serving_agent_pid();
    std::thread::sleep(Duration::from_secs(5));
    let idle_rss = rss(pid);
    let daemon = Daemon::start(&controller, &[]);
    // Let the stream settle, then measure a minute of streaming.
    std::thread::sleep(Duration::from_secs(5));
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    let window = Duration::from_secs(60);
    std::thread::sleep(window);
    let share = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    let streaming_rss = rss(pid);
    drop(daemon);
    let binary = imfleet_tests::bin("agent");
    let stripped = std::env::temp_dir().join("imfleet-agent-stripped");
    let ok = std::process::Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(&binary)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let size = std::fs::metadata(if ok { &stripped } else { &binary })
        .unwrap()
        .len();
    println!(
        "bench: agent binary {} ({:.1} MiB{})",
        binary.display(),
        mib(size),
        if ok {
            ", stripped"
        } else {
            ", NOT stripped: no strip(1)"
        }
    );
    println!(
        "bench: agent RSS idle {:.1} MiB (target < 10 MiB)",
        mib(idle_rss)
    );
    println!(
        "bench: agent RSS streaming at 1 s {:.1} MiB (target < 10 MiB)",
        mib(streaming_rss)
    );
    println!(
        "bench: agent CPU streaming at 1 s {:.3} % of one core over {} s (target < 0.5 %)",
        share * 100.0,
        window.as_secs()
    );
}

#[test]
#[ignore = "benchmark: bench/health-stream"]
fn daemon_with_many_simulated_agents_at_one_second() {
    let count: usize = std::env::var("IMFLEET_BENCH_AGENTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000);
    imfleet_certs::install_crypto_provider();
    let _ =
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 65_536, 65_536);
    let controller = Controller::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let started = Instant::now();
    let healthy = vec![imfleet_tests::sim_agents::Behaviour::Healthy; count];
    imfleet_tests::sim_agents::start_for(&controller, &runtime, &healthy);
    println!(
        "bench: {count} simulated agents up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let daemon = Daemon::start(&controller, &[]);
    let pid = daemon.pid();
    let deadline = Instant::now() + Duration::from_secs(300);
    let connected = Instant::now();
    loop {
        let page = daemon.scrape();
        let up = page
            .lines()
            .filter(|l| l.starts_with("imfleet_agent_up{") && l.ends_with(" 1"))
            .count();
        if up == count {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {up} of {count} streaming:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    println!(
        "bench: all {count} streams open after {:.1} s",
        connected.elapsed().as_secs_f64()
    );
    std::thread::sleep(Duration::from_secs(10));
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(60));
    let share = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    println!(
        "bench: daemon RSS with {count} streams {:.1} MiB (target < 200 MiB)",
        mib(rss(pid))
    );
    println!(
        "bench: daemon CPU with {count} streams at 1 s: {:.1} % of one core (of 200 % on this machine)",
        share * 100.0
    );
    let mut times = Vec::new();
    for _ in 0..5 {
        let run = controller.run(&["status", "--all", "--json"]);
        assert!(run.success(), "{run:#?}");
        assert!(
            run.stdout.contains("\"source\": \"daemon\""),
            "status did not come from the daemon"
        );
        times.push(run.elapsed);
    }
    times.sort();
    println!(
        "bench: controller status --all --json for {count} hosts: median {:.0} ms, max {:.0} ms (target < 200 ms; the process start included)",
        times[2].as_secs_f64() * 1000.0,
        times[4].as_secs_f64() * 1000.0
    );
    let (_, page) = imfleet_tests::daemon::http_get(daemon.metrics, "/metrics").unwrap();
    println!(
        "bench: /metrics page {:.1} MiB for {count} hosts",
        mib(page.len() as u64)
    );
    drop(daemon);
    drop(runtime);
}
