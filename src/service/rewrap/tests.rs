//! Unit tests of the re-wrap job: what moves, the progress stream's wake-up, counting.

use super::*;

#[test]
fn what_moves() {
    assert!(moves(1, 0, 3) && moves(2, 0, 3) && !moves(3, 0, 3));
    assert!(moves(1, 1, 3) && !moves(2, 1, 3));
}

/// The next progress message, which only the wake-up of a save can deliver in time.
async fn woken<T, E: std::fmt::Debug>(rx: &mut tokio::sync::mpsc::Receiver<Result<T, E>>) -> T {
    tokio::time::timeout(Duration::from_secs(60), rx.recv())
        .await
        .expect("the stream was not woken by the save")
        .unwrap()
        .unwrap()
}

/// A progress stream sees the end as soon as it is saved on this replica: its poll is an
/// hour here, so only the wake-up of the save can deliver it.
#[tokio::test]
async fn a_progress_stream_is_woken_by_a_save_not_only_by_its_poll() {
    let stored = Arc::new(std::sync::Mutex::new(Progress {
        state: "running".into(),
        total: 10,
        ..Progress::default()
    }));
    let first = stored.lock().unwrap().clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let s = stored.clone();
    let load = move || {
        let p = s.lock().unwrap().clone();
        async move { Ok(p) }
    };
    let follower = tokio::spawn(follow(first, load, Duration::from_secs(3600), tx));
    let got = rx.recv().await.unwrap().unwrap();
    assert_eq!((got.state.as_str(), got.rewrapped), ("running", 0));
    // The job saves a page, then the end; each save announces itself.
    stored.lock().unwrap().rewrapped = 4;
    announce();
    let got = woken(&mut rx).await;
    assert_eq!((got.state.as_str(), got.rewrapped), ("running", 4));
    {
        let mut p = stored.lock().unwrap();
        p.rewrapped = 10;
        p.state = "finished".into();
    }
    announce();
    let got = woken(&mut rx).await;
    assert_eq!((got.state.as_str(), got.rewrapped), ("finished", 10));
    // And the stream ends there.
    assert!(rx.recv().await.is_none());
    follower.await.unwrap();
}

/// Counting decodes only a record's key version, but refuses what decoding the whole
/// record refuses, so it counts the same records.
#[test]
fn counting_reads_the_key_version_of_exactly_the_records_that_decode() {
    use prost::Message;
    let r = SealedRecord {
        name: "a/b".into(),
        version: 3,
        master_key_version: 7,
        ciphertext: vec![1; 100],
        created_by: "x".into(),
        ..SealedRecord::default()
    };
    let bytes = r.encode_to_vec();
    assert_eq!(
        KeyVersionOf::decode(bytes.as_slice())
            .unwrap()
            .master_key_version,
        7
    );
    // created_by (field 9) not UTF-8: neither decodes.
    let mut bad = bytes.clone();
    let at = bad.len() - 1;
    assert_eq!(bad[at], b'x');
    bad[at] = 0xff;
    assert!(SealedRecord::decode(bad.as_slice()).is_err());
    assert!(KeyVersionOf::decode(bad.as_slice()).is_err());
    // Truncated: neither decodes.
    let cut = &bytes[..bytes.len() - 1];
    assert!(SealedRecord::decode(cut).is_err());
    assert!(KeyVersionOf::decode(cut).is_err());
}
