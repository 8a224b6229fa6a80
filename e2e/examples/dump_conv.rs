// scratch (not committed): prints a conversation from a kept store
use chat_store::{EmbeddedStore, MessageStore, PageQuery};
#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let store = EmbeddedStore::open(std::path::PathBuf::from(&args[1])).unwrap();
    let conv = &args[2];
    let mut after = 0;
    loop {
        let page = store
            .page(conv, PageQuery::After { after, limit: 500 })
            .await
            .unwrap();
        for m in &page.messages {
            println!(
                "{} {} {} ts={} sseq={} ev={:?}",
                m.seq, m.from, m.client_id, m.ts_ms, m.stream_seq, m.event
            );
        }
        match page.messages.last() {
            Some(l) => after = l.seq,
            None => break,
        }
        if !page.more {
            break;
        }
    }
}
