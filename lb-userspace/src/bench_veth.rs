//! placeholder, filled in below
pub fn run(_seconds: u32) -> anyhow::Result<serde_json::Value> {
    anyhow::bail!("not yet")
}
