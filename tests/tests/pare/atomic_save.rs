//! A save killed midway leaves the destination exactly as it was.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use pare_core_tensor::io::{RawTensor, StDtype, save_tensors};

const CHILD_ENV: &str = "PARE_TEST_SAVE_CHILD";
const TEST_NAME: &str = "pare::atomic_save::a_killed_save_leaves_the_destination_untouched";

/// In the child process: write a large file to the path in `CHILD_ENV`, slowly enough to be
/// killed while the temp file is being written.
fn child_save(dest: PathBuf) {
    let chunk = 64 << 20;
    let tensors: BTreeMap<String, RawTensor> = (0..8)
        .map(|i| (format!("t{i}"), RawTensor { dtype: StDtype::U8, shape: vec![chunk], data: vec![i as u8; chunk] }))
        .collect();
    save_tensors(&dest, &tensors, &BTreeMap::new(), &[]).unwrap();
}

#[test]
fn a_killed_save_leaves_the_destination_untouched() {
    if let Some(dest) = std::env::var_os(CHILD_ENV) {
        child_save(PathBuf::from(dest));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("model.safetensors");
    let old = b"the previous version of the file".to_vec();
    std::fs::write(&dest, &old).unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &dest)
        .spawn()
        .unwrap();
    // Wait until the child's temp file holds data, then kill it mid-write.
    let deadline = Instant::now() + Duration::from_secs(60);
    let tmp = loop {
        let found = std::fs::read_dir(dir.path()).unwrap().filter_map(Result::ok).find(|e| {
            e.file_name().to_string_lossy().ends_with(".tmp") && e.metadata().is_ok_and(|m| m.len() > 1 << 20)
        });
        if let Some(e) = found {
            break e.path();
        }
        assert!(Instant::now() < deadline, "the child never started writing");
        assert!(child.try_wait().unwrap().is_none(), "the child finished before it could be killed");
        std::thread::sleep(Duration::from_millis(1));
    };
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the child was killed, it cannot have succeeded");
    assert_eq!(std::fs::read(&dest).unwrap(), old, "the destination changed");
    assert!(tmp.file_name().unwrap().to_string_lossy().starts_with(".model.safetensors."));
}
