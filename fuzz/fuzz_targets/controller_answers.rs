//! What the controller reads from others: a host's answer to the bootstrap
//! probe (over SSH, from a host that may be hostile), an agent binary's ELF
//! header, PBX API bodies, and a health sample from an agent that root on
//! its host controls. No parser may panic; what the daemon keeps of a
//! sample stays within its caps, printable, and on a bounded /metrics page.
#![no_main]

use imfleet_controller::bootstrap::plan;
use imfleet_controller::health::{HostSnapshot, ingest, metrics};
use imfleet_controller::pbx::client::parse_answer;
use imfleet_proto::agent::v1::HealthSample;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let _ = plan::elf_arch(data);
    let text = String::from_utf8_lossy(data);
    let _ = plan::parse_probe(&text);
    let _ = parse_answer(&text);
    let _ = imfleet_proto::model::reference::valid_image_reference(&text);
    let shown = imfleet_controller::text::printable(&text, 64);
    assert!(!shown.chars().any(imfleet_controller::text::is_unsafe));
    if let Ok(sample) = HealthSample::decode(data) {
        let (kept, _) = ingest::admit(sample, Some(0));
        assert!(kept.containers.len() <= ingest::MAX_CONTAINERS);
        for c in &kept.containers {
            assert!(!c.state.chars().any(imfleet_controller::text::is_unsafe));
        }
        let host = HostSnapshot {
            host: "fuzz".into(),
            agent_up: true,
            sample: Some(kept),
            ..Default::default()
        };
        let page = metrics::page(&[host], Default::default());
        let series = page.lines().filter(|l| !l.starts_with('#')).count();
        assert!(series <= metrics::MAX_SERIES_PER_HOST + 8);
    }
});
