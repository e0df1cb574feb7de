//! Any bytes a monitor client may send: as QMP requests (a JSON stream, each value executed
//! in one session) and as HMP lines, against a control plane with no VM. Every QMP answer is
//! a `return` or an `error` object, as QEMU's are; nothing panics.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::event::{hmp, qmp};
use vmm::Control;

fuzz_target!(|data: &[u8]| {
    let control = Control::default();
    let mut session = qmp::Session::default();
    let stream = serde_json::Deserializer::from_slice(data).into_iter::<serde_json::Value>();
    for request in stream.take(64) {
        let Ok(request) = request else { break };
        let (reply, _quit) = qmp::execute(&request, &mut session, &control);
        assert!(
            reply.get("return").is_some() || reply.get("error").is_some(),
            "{reply}"
        );
    }
    for line in String::from_utf8_lossy(data).lines().take(64) {
        let _ = hmp::execute(line, &control);
    }
});
