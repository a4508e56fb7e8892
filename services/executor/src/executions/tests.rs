//! Poison jobs, from inside: jobs that can never run end FAILED and are dead-lettered.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use csp_bus::{GroupStart, NewEvent};
use csp_testkit::TestEnv;

use super::{Executor, GROUP, JOBS, events::is_final, stream};
use crate::{entity::execution, repo, stored::StoredFailure};

fn row(id: &str, plan: &str) -> execution::Model {
    execution::Model {
        id: id.into(),
        design_id: uuid::Uuid::new_v4().to_string(),
        design_revision: 1,
        status: "queued".into(),
        started_by: "alice".into(),
        created_at: chrono::Utc::now(),
        started_at: None,
        finished_at: None,
        inputs: "{}".into(),
        outputs: "{}".into(),
        error: None,
        nodes: "[]".into(),
        options: "{}".into(),
        plan: plan.into(),
        attempt: 0,
        retry_of: None,
        retry_from: None,
        paused_at: String::new(),
        idempotency_key: None,
        cancel_requested: None,
        last_error: None,
        runner: String::new(),
    }
}

async fn ended(db: &sea_orm::DatabaseConnection, id: &str) -> (execution::Model, StoredFailure) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let row = repo::get(db, id).await.unwrap().unwrap();
        if row.finished_at.is_some() {
            let failure = serde_json::from_str(row.error.as_deref().unwrap()).unwrap();
            return (row, failure);
        }
        assert!(Instant::now() < deadline, "never ended: {row:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A job whose plan cannot be read fails each delivery; the third is the last: the execution
/// ends FAILED naming the cause, the job is acknowledged, and a dead letter keeps it. A job
/// whose replicas kept dying (delivered more often than allowed) is given up unrun.
async fn jobs_that_cannot_run_are_dead_lettered(env: TestEnv) {
    let mut settings = env.settings();
    settings.executor.lease = Duration::from_secs(1);
    settings.executor.max_deliveries = 3;
    settings.executor.threads = 1;
    let db = csp_store::open::<crate::migration::Migrator>(&settings, crate::SERVICE).await.unwrap();
    let db = db.conn().clone();
    let bus = env.bus();
    bus.create_group(JOBS, GROUP, GroupStart::Beginning).await.unwrap();

    // Crash-looping: delivered (and abandoned) by three replicas that died before we start.
    let crashing = uuid::Uuid::now_v7().to_string();
    assert!(repo::insert(&db, row(&crashing, r#"{"nodes":[],"connections":[]}"#)).await.unwrap());
    let job = bus.append(JOBS, NewEvent::new(crashing.clone()), None).await.unwrap();
    assert_eq!(bus.read_group(JOBS, GROUP, "died-1", 10, Duration::ZERO).await.unwrap().len(), 1);
    for (from, to) in [("died-1", "died-2"), ("died-2", "died-3")] {
        assert_eq!(bus.release(JOBS, GROUP, from, &[job]).await.unwrap(), 1);
        let claimed = bus.claim_idle(JOBS, GROUP, to, Duration::from_secs(3600), 10).await.unwrap();
        assert_eq!(claimed.len(), 1);
    }
    bus.release(JOBS, GROUP, "died-3", &[job]).await.unwrap();
    // Unreadable: fails every time it is delivered.
    let unreadable = uuid::Uuid::now_v7().to_string();
    assert!(repo::insert(&db, row(&unreadable, "{not a plan")).await.unwrap());
    bus.append(JOBS, NewEvent::new(unreadable.clone()), None).await.unwrap();

    let executor = Executor::new(db.clone(), bus.clone(), &settings).unwrap();
    executor.spawn_workers().await.unwrap();

    let (row, failure) = ended(&db, &unreadable).await;
    assert_eq!(row.status, "failed");
    assert_eq!(failure.code, "too_many_deliveries");
    assert!(failure.message.starts_with("given up after 3 deliveries: "), "{}", failure.message);
    assert!(failure.message.contains("the stored plan cannot be read"), "{}", failure.message);
    assert_eq!(row.attempt, 0, "it never started");

    let (row, failure) = ended(&db, &crashing).await;
    assert_eq!((row.status.as_str(), failure.code.as_str()), ("failed", "too_many_deliveries"));
    assert!(
        failure.message.starts_with("given up after 4 deliveries: the replica running it stopped"),
        "{}",
        failure.message
    );

    let letters = executor.dead_letters(0, "").await.unwrap();
    let mut ids: Vec<&str> = letters.items.iter().map(|d| d.execution_id.as_str()).collect();
    ids.sort_unstable();
    let mut expected = vec![unreadable.as_str(), crashing.as_str()];
    expected.sort_unstable();
    assert_eq!(ids, expected);
    let letter = letters.items.iter().find(|d| d.execution_id == unreadable).unwrap();
    assert_eq!(letter.deliveries, 3);
    assert!(letter.last_error.contains("the stored plan cannot be read"));
    // Paged, newest first.
    let page = executor.dead_letters(1, "").await.unwrap();
    assert_eq!(page.items.len(), 1);
    let rest = executor.dead_letters(1, &page.next_page_token).await.unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_ne!(rest.items[0].execution_id, page.items[0].execution_id);
    assert!(rest.next_page_token.is_empty());

    // Both acknowledged; each stream has its one final status.
    let deadline = Instant::now() + Duration::from_secs(10);
    while bus.pending(JOBS, GROUP).await.unwrap().count > 0 {
        assert!(Instant::now() < deadline, "the given-up jobs stay pending");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for id in [&unreadable, &crashing] {
        let events = bus.read(&stream(id), None, 100).await.unwrap();
        assert_eq!(events.iter().filter(|e| is_final(e)).count(), 1, "{id}");
    }
    executor.stop_workers();
}

csp_testkit::backend_tests!(jobs_that_cannot_run_are_dead_lettered);
