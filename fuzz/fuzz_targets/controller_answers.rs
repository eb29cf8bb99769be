//! What the controller reads from others: a host's answer to the bootstrap
//! probe (over SSH, from a host that may be hostile), an agent binary's ELF
//! header, and PBX API bodies. No parser may panic.
#![no_main]

use imfleet_controller::bootstrap::plan;
use imfleet_controller::pbx::client::parse_answer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = plan::elf_arch(data);
    let text = String::from_utf8_lossy(data);
    let _ = plan::parse_probe(&text);
    let _ = parse_answer(&text);
});
