//! The YAML config file (`MtaConfig::from_yaml`), which the operator renders from custom
//! resources that tenants write, on arbitrary UTF-8.
//!
//! Asserted: no panic (nor stack overflow); a config that parses also validates; and
//! `to_yaml()` of it parses back (through `from_yaml`, so validation again) to an equal value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mta_config::MtaConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = MtaConfig::from_yaml(text) else {
        return;
    };
    if let Err(e) = config.validate() {
        panic!("from_yaml accepted a config that validate() refuses: {e}");
    }
    let yaml = config.to_yaml();
    let again = match MtaConfig::from_yaml(&yaml) {
        Ok(again) => again,
        Err(e) => panic!("to_yaml output does not parse back: {e}\n--- yaml ---\n{yaml}"),
    };
    assert_eq!(config, again, "round trip changed the config\n--- yaml ---\n{yaml}");
});
