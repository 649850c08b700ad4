#ifndef SAGAD_CHECKPOINTER_H
#define SAGAD_CHECKPOINTER_H

/*
 * A thread that checkpoints the store's write-ahead log with a connection
 * of its own, so that the event loop never does it. SQLite's automatic
 * checkpoint runs inside the COMMIT that crosses the threshold: it copies
 * the log's pages into the database and fsyncs both files, and the loop
 * waits meanwhile (a few milliseconds, several times a second under load).
 * A passive checkpoint on another connection blocks no writer: commits go
 * on appending to the log, which restarts from its beginning at the first
 * commit after a checkpoint that copied everything.
 */
struct checkpointer;

/* Opens its own connection to the database at path (journal_mode=WAL
 * already set by the writer). NULL and *err (malloc'd) on failure. */
struct checkpointer *checkpointer_new(const char *path, char **err);
/* From the writer's thread: the log has grown past the threshold. Cheap;
 * pokes while a checkpoint runs are served by one more. */
void checkpointer_poke(struct checkpointer *c);
/* Checkpoints done so far (for tests and metrics). */
unsigned long checkpointer_count(struct checkpointer *c);
/* Waits for a running checkpoint, stops the thread, closes the connection. */
void checkpointer_free(struct checkpointer *c);

#endif
