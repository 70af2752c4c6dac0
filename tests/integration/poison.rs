//! No single input stops invalidation: a key in Redis that is not UTF-8, a row value too
//! long for Redis to take as a key, a manual message that would match everything.

use crate::routing::drained;
use crate::support::{self, Running, cache, existing, fresh_db, redis_conn, write_config};
use redis::AsyncCommands;
use walbust::offline::throwaway::ThrowawayRedis;

const ITEMS: &str = "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);
                     ALTER TABLE items REPLICA IDENTITY FULL;";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_is_not_utf8_matching_a_pattern_is_deleted_and_invalidation_goes_on() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let rules = format!(
        "[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\npatterns = [\"{n}:p:{{name}}:*\"]\n"
    );
    let files = write_config(&db, &s.redis.url(), &rules, "");
    let mut redis = redis_conn(&s.redis.url()).await;
    let binary: Vec<u8> = [format!("{n}:p:x:").as_bytes(), b"\xff\xfe"].concat();
    let _: () = redis.set(&binary, "v").await.unwrap();
    let items: Vec<String> = (1..=2).map(|i| format!("{n}:item:{i}")).collect();
    cache(&mut redis, &items).await;
    let run = Running::start(&files.path).await;

    db.client.batch_execute("INSERT INTO items VALUES (1, 'x')").await.unwrap();
    db.client.batch_execute("INSERT INTO items VALUES (2, 'y')").await.unwrap();
    drained(&run, &db.client).await;
    let left: bool = redis.exists(&binary).await.unwrap();
    assert!(!left, "the binary key matching the pattern is deleted");
    assert!(existing(&mut redis, &items).await.is_empty(), "later changes are applied");
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_value_longer_than_proto_max_bulk_len_does_not_stall_invalidation() {
    let s = support::shared();
    let own = tokio::task::spawn_blocking(ThrowawayRedis::start).await.unwrap().expect("own redis");
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let rules = format!("[[rule]]\nname = \"by name\"\ntable = \"items\"\nkeys = [\"{n}:name:{{name}}\"]\n");
    let files = write_config(&db, &own.url(), &rules, "");
    let mut redis = redis_conn(&own.url()).await;
    // The smallest limit Redis allows: a 2 MB key would make it drop the connection.
    let _: () =
        redis::cmd("CONFIG").arg("SET").arg("proto-max-bulk-len").arg("1mb").query_async(&mut redis).await.unwrap();
    let keys = vec![format!("{n}:name:short"), format!("{n}:name:other")];
    cache(&mut redis, &keys).await;
    let run = Running::start(&files.path).await;

    db.client.execute("INSERT INTO items VALUES (1, $1)", &[&"x".repeat(2 << 20)]).await.unwrap();
    db.client.batch_execute("INSERT INTO items VALUES (2, 'short')").await.unwrap();
    drained(&run, &db.client).await;
    assert!(
        existing(&mut redis, &keys).await.is_empty(),
        "the huge key was widened to a pattern over every name, and the next change applied"
    );
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_message_matching_everything_is_refused_and_prefixes_narrow_the_rest() {
    let s = support::shared();
    let db = fresh_db(&s.pg, ITEMS).await;
    let n = db.name.clone();
    let rules = format!("[[rule]]\nname = \"items\"\ntable = \"items\"\nkeys = [\"{n}:item:{{id}}\"]\n");
    let files = write_config(&db, &s.redis.url(), &rules, &format!("manual_prefixes = [\"{n}:admin:\"]"));
    let mut redis = redis_conn(&s.redis.url()).await;
    let session = format!("{n}:session:1");
    let admin = format!("{n}:admin:defaults");
    let item = format!("{n}:item:1");
    cache(&mut redis, &[session.clone(), admin.clone(), item.clone()]).await;
    let run = Running::start(&files.path).await;

    let emit = |body: String| format!("SELECT pg_logical_emit_message(true, 'walbust', '{body}')");
    db.client.batch_execute(&emit(r#"{"patterns":["*"]}"#.into())).await.unwrap();
    db.client.batch_execute(&emit(format!(r#"{{"keys":["{session}"],"tags":["{session}"]}}"#))).await.unwrap();
    db.client.batch_execute(&emit(format!(r#"{{"keys":["{admin}"]}}"#))).await.unwrap();
    db.client.batch_execute("INSERT INTO items VALUES (1, 'x')").await.unwrap();
    drained(&run, &db.client).await;
    assert_eq!(existing(&mut redis, &[session.clone(), admin, item]).await, [session], "only the session key stays");
    run.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_are_sorted_into_set_aside_and_retried() {
    let s = support::shared();
    let mut redis = redis_conn(&s.redis.url()).await;
    // A command Redis can never run as sent.
    let malformed = redis::cmd("UNLINK").query_async::<redis::Value>(&mut redis).await.unwrap_err();
    assert!(walbust::sink::refused_for_good(&malformed), "{malformed}");
    // Nothing listens here: the connection fails, which waiting can fix.
    let closed = redis::Client::open("redis://127.0.0.1:1/").unwrap().get_multiplexed_async_connection().await;
    let Err(refused) = closed else { panic!("nothing listens on port 1") };
    assert!(!walbust::sink::refused_for_good(&refused), "{refused}");
}
