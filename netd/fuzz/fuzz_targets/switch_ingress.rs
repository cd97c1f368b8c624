//! Fuzzes the switch's ingress: any frame from any port must never panic.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use netd::switch::{Network, PortClass, PortTx, TxError};

struct Null;
impl PortTx for Null {
    fn send(&self, _frame: &[u8]) -> Result<(), TxError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let net = Network::new("f", 1500, 4, Duration::from_secs(1));
    let a = net.add_port("a", PortClass::Tap, Box::new(Null)).unwrap();
    let b = net.add_port("b", PortClass::Tap, Box::new(Null)).unwrap();
    for (i, chunk) in data.chunks(97).enumerate() {
        net.ingress(if i % 2 == 0 { &a } else { &b }, chunk);
    }
    net.ingress(&a, data);
});
