/*
 * The store's room on its disk (issue 14, A7): how much it holds, how much
 * its file system has free, the headroom it keeps for deletes and
 * checkpoints once the disk is full, and the checkpoint size that follows
 * from it. The engine (store.c) counts at commits; the record files ask
 * store_room_for before they add a record.
 */
#include "store_records.h"

#include <stdio.h>
#include <sys/statvfs.h>

#include "log.h"

/* The write-ahead log is checkpointed (inside a COMMIT, on the loop, with
 * its fsyncs) every STORE_CKPT_PAGES pages; every STORE_CKPT_PAGES_TIGHT when
 * the disk has less than STORE_CKPT_ROOM free, where a big log could fill
 * it. */
#define STORE_CKPT_PAGES 1024
#define STORE_CKPT_PAGES_TIGHT 256
#define STORE_CKPT_PAGES_MIN 16
#define STORE_CKPT_ROOM ((int64_t)64 << 20)
/* Pages kept free beyond two checkpoint windows (store_headroom). */
#define STORE_ROOM_PAGES 32

/*
 * A bigger log means fewer checkpoints, and the loop waits for the fsyncs
 * of each (a quarter of them: at 1 MiB, 23 a second under a full inbox
 * load), and hot pages are copied once instead of four times. Near a full
 * disk the log stays small, and shrinks back after each checkpoint, so
 * that it cannot be what fills the disk; below 16 MiB free it shrinks with
 * the free space (a 64th of it), because the store keeps two windows of
 * it free (store_headroom).
 */
int
store_checkpoint_pages(int64_t free_bytes)
{
	int64_t pages = free_bytes >> 16;

	if (free_bytes >= STORE_CKPT_ROOM)
		return STORE_CKPT_PAGES;
	if (pages > STORE_CKPT_PAGES_TIGHT)
		return STORE_CKPT_PAGES_TIGHT;
	return pages < STORE_CKPT_PAGES_MIN ? STORE_CKPT_PAGES_MIN : (int)pages;
}

/*
 * What the file system must keep free for the store itself: once a disk
 * is full, deleting a confirmed message still writes to the write-ahead
 * log, and the checkpoint that empties the log copies its pages into the
 * database file, which may have to grow. A store that used that room for
 * new messages wedges for good: nothing can be deleted, so nothing frees
 * room (issue 14, A7). Two checkpoint windows (the log's pages waiting to
 * be copied, and the log of the deletes that follow) and a margin.
 */
int64_t
store_headroom(int ckpt_pages, int64_t page_size)
{
	return (2 * (int64_t)ckpt_pages + STORE_ROOM_PAGES) * page_size;
}

/*
 * Room for size more bytes? Within max_bytes, and without eating into the
 * headroom. What counts as free: the file system's free space and the free
 * pages inside the file (reused without growing it), less twice what was
 * added since the count (a new page is written to the log, then copied to
 * the file).
 */
int
store_has_room(const struct store *st, int64_t size)
{
	int64_t added = st->bytes - st->counted + st->tx_bytes + size;

	if (st->bytes + st->tx_bytes + size > st->max_bytes)
		return 0;
	if (st->fs_free < 0)
		return 1;
	return st->fs_free + st->reusable - 2 * added >=
	    store_headroom(st->ckpt_pages, st->page_size);
}

/* A new record refused or accepted again: an operator sees why. */
void
store_note_room(struct store *st, int room)
{
	if (room == !st->refusing)
		return;
	st->refusing = !room;
	if (room)
		log_info("store has room again", LOG_STR("path", st->path));
	else
		log_warn("store refuses new messages: file system nearly full",
		    LOG_STR("path", st->path), LOG_INT("free_bytes", st->fs_free),
		    LOG_INT("headroom_bytes", store_headroom(st->ckpt_pages, st->page_size)));
}

/* Room for a new record of size bytes (logged when that changes). */
int
store_room_for(struct store *st, int64_t size)
{
	int room = store_has_room(st, size);

	store_note_room(st, room);
	return room;
}

static void
store_tune_checkpoint(struct store *st)
{
	int pages;
	char sql[64];

	if (st->fs_free >= 0)
		pages = store_checkpoint_pages(st->fs_free);
	else if (st->ckpt_pages)
		return;		/* unknown: as it is */
	else
		pages = STORE_CKPT_PAGES_TIGHT;
	if (pages == st->ckpt_pages)
		return;
	st->ckpt_pages = pages;
	sqlite3_wal_autocheckpoint(st->db, pages);
	/* Kept above the checkpoint size, the log's file is reused as it
	 * is: truncated at every restart, it would grow again and each fsync
	 * would also commit the file system's journal (1.0-1.7 -> 0.7-1.0
	 * ms per fdatasync under full inbox load). */
	snprintf(sql, sizeof sql, "PRAGMA journal_size_limit=%lld",
	    (long long)pages * 4 * (st->page_size > 0 ? st->page_size : 4096));
	sqlite3_exec(st->db, sql, NULL, NULL, NULL);
}

/* Count the pages in use and free, and the free space of the file system;
 * then size the checkpoints for it. */
void
store_count(struct store *st)
{
	sqlite3_stmt *s = st->stmt[ST_PAGES];
	struct statvfs sv;

	if (sqlite3_step(s) == SQLITE_ROW) {
		int64_t pages = sqlite3_column_int64(s, 0), unused = sqlite3_column_int64(s, 1);
		st->bytes = st->counted = (pages - unused) * st->page_size;
		st->reusable = unused * st->page_size;
	}
	sqlite3_reset(s);
	st->uncounted = 0;
	if (fstatvfs(st->lock_fd, &sv) == 0)
		st->fs_free = (int64_t)sv.f_bavail * (int64_t)sv.f_frsize;
	else
		st->fs_free = -1;
	store_tune_checkpoint(st);
}

/* Close to the headroom, or to max_bytes, where the count decides between
 * 202 and 507: counted at every commit. */
int
store_count_near(const struct store *st)
{
	int64_t added = st->bytes - st->counted;

	return st->bytes >= st->max_bytes - st->max_bytes / 4 ||
	    (st->fs_free >= 0 && st->fs_free - 2 * added < STORE_CKPT_ROOM);
}
