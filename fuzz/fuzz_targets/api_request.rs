//! Arbitrary bytes as an API request body, through the decoder every route uses and the
//! checks each request then gets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_agent::{agent::validate_name, cluster::ipam};
use mesh_api::v1::{
    ExecRequest, NetworkCreate, NodeUpdate, ServiceCreate, ServiceUpdate, TaskRun, decode_request,
};

fuzz_target!(|bytes: &[u8]| {
    if let Ok(r) = decode_request::<ServiceCreate>(bytes) {
        let _ = validate_name("service", &r.spec.name);
    }
    if let Ok(r) = decode_request::<ServiceUpdate>(bytes) {
        let _ = r.health.apply(None, &r.publish_add);
        let _ = r.restart.apply(Default::default());
    }
    if let Ok(r) = decode_request::<NetworkCreate>(bytes) {
        let _ = validate_name("network", &r.name);
        if let Some(s) = r.subnet
            && let Ok(net) = s.parse()
        {
            let _ = ipam::validate_subnet(net);
        }
    }
    if let Ok(r) = decode_request::<NodeUpdate>(bytes) {
        let _ = r.labels_to_add();
    }
    let _ = decode_request::<TaskRun>(bytes);
    let _ = decode_request::<ExecRequest>(bytes);
});
