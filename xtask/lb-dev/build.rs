//! Embeds the benchmark's no-op floor programs (`floor` for XDP, `floor_tc` for tc),
//! which lb-userspace's build script builds with the datapath but does not ship.

fn main() {
    let Ok(path) = std::env::var("DEP_LB_EBPF_FLOOR_OBJECT") else {
        panic!("lb-userspace's build script did not report the floor object (DEP_LB_EBPF_FLOOR_OBJECT)");
    };
    println!("cargo:rerun-if-changed={path}");
    println!("cargo:rustc-env=LB_FLOOR_OBJECT={path}");
}
