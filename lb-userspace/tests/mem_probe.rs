use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
struct Count;
static LIVE: AtomicUsize = AtomicUsize::new(0);
unsafe impl GlobalAlloc for Count {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 { LIVE.fetch_add(l.size(), Ordering::Relaxed); unsafe { System.alloc(l) } }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) { LIVE.fetch_sub(l.size(), Ordering::Relaxed); unsafe { System.dealloc(p, l) } }
}
#[global_allocator]
static G: Count = Count;
fn mb() -> f64 { LIVE.load(Ordering::Relaxed) as f64 / 1e6 }
#[test]
fn probe() {
    use lb_userspace::agent::{k8s, model, sync::*};
    let text = std::fs::read_to_string("/tmp/memtest/big.yaml").unwrap();
    let p = k8s::parse_yaml(&text);
    drop(text);
    let mut snap = p.snapshot;
    eprintln!("parsed objects: {:.1} MB", mb());
    let svcs: Vec<_> = snap.services.drain(..).map(|s| { let mut s = (*s).clone(); k8s::slim_service(&mut s); std::sync::Arc::new(s) }).collect();
    let sl: Vec<_> = snap.slices.drain(..).map(|s| { let mut s = (*s).clone(); k8s::slim_slice(&mut s); std::sync::Arc::new(s) }).collect();
    eprintln!("slimmed objects: {:.1} MB", mb());
    let base = mb();
    let c = model::compute(svcs.iter().map(|s| s.as_ref()), sl.iter().map(|s| s.as_ref()));
    eprintln!("desired: {:.1} MB", mb() - base);
    struct Null;
    impl MapWriter for Null { fn apply(&mut self, _: &Op) -> Result<(), WriteError> { Ok(()) } }
    let b2 = mb();
    let mut s = Syncer::new(262144);
    s.sync(&c.desired, &mut Null).unwrap();
    eprintln!("shadow: {:.1} MB", mb() - b2);
    drop(sl);
    eprintln!("after dropping slices: {:.1} MB", mb());
}
