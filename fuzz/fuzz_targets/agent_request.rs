//! What a controller (or someone holding its key) sends: a deployment spec,
//! an image upload header, log and control names. The agent's checks must
//! never panic, and a spec they accept must keep every path in the roots.
#![no_main]

use std::path::Path;

use imfleet_agent::deploy::{record::DeploymentRecord, validate};
use imfleet_agent::policy::{self, Roots};
use imfleet_proto::agent::v1::{ControlRequest, DeploymentSpec, ImageChunk, LogsRequest};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let roots = Roots::new("/var/lib/portsip", Some("/srv/im"), Path::new("/opt/imfleet"))
        .expect("fixed roots");
    if let Ok(spec) = DeploymentSpec::decode(data) {
        let structural = validate::check(&spec, |_| false);
        if policy::check_spec(&spec, &roots).is_ok() {
            for d in &spec.directories {
                assert!(roots.contains(Path::new(&d.path)), "{}", d.path);
            }
            for c in &spec.containers {
                for m in &c.mounts {
                    assert!(spec.directories.iter().any(|d| d.path == m.source));
                }
            }
        }
        let _ = structural;
        let record = DeploymentRecord::default().updated_for(&spec);
        let _ = policy::check_purge(&record.directories, &record.directories, &roots);
    }
    if let Ok(chunk) = ImageChunk::decode(data) {
        let _ = chunk.header.map(|h| validate::valid_name(&h.name));
    }
    if let Ok(logs) = LogsRequest::decode(data) {
        let _ = validate::valid_name(&logs.deployment) && validate::valid_name(&logs.container);
    }
    if let Ok(control) = ControlRequest::decode(data) {
        let _ = policy::check_purge(&control.purge_paths, &[], &roots);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = policy::canonical(text);
        let _ = policy::check_root(text, Path::new("/opt/imfleet"));
    }
});
