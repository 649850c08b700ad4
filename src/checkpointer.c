#include "checkpointer.h"

#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>

#include "log.h"

enum checkpointer_state {
	CHECKPOINTER_IDLE,	/* waiting for a poke */
	CHECKPOINTER_RUNNING,	/* a checkpoint runs */
	CHECKPOINTER_STOPPING
};

struct checkpointer {
	sqlite3 *db;
	pthread_t thread;
	pthread_mutex_t lock;
	pthread_cond_t wake;
	enum checkpointer_state state;	/* under lock */
	int poked;			/* under lock: a checkpoint is wanted */
	unsigned long count;		/* under lock: checkpoints done */
	int failing;			/* thread only: the last one failed (logged once) */
};

static void
checkpointer_run(struct checkpointer *c)
{
	int log_frames = 0, copied = 0;
	int rc = sqlite3_wal_checkpoint_v2(c->db, "main", SQLITE_CHECKPOINT_PASSIVE,
	    &log_frames, &copied);

	/* BUSY: another checkpoint (the writer's own, on a full disk) runs;
	 * the next poke tries again. Anything else is said once, and again
	 * only after a success: a store that cannot be checkpointed grows its
	 * log, which max_bytes and the disk-full handling then meet. */
	if (rc != SQLITE_OK && rc != SQLITE_BUSY) {
		if (!c->failing)
			log_warn("msg=\"store checkpoint failed, the write-ahead log grows\" error=\"%s\"",
			    sqlite3_errmsg(c->db));
		c->failing = 1;
	} else if (rc == SQLITE_OK) {
		if (c->failing)
			log_info("msg=\"store checkpoints work again\"");
		c->failing = 0;
	}
}

static void *
checkpointer_main(void *arg)
{
	struct checkpointer *c = arg;

	pthread_mutex_lock(&c->lock);
	for (;;) {
		while (c->state != CHECKPOINTER_STOPPING && !c->poked)
			pthread_cond_wait(&c->wake, &c->lock);
		if (c->state == CHECKPOINTER_STOPPING)
			break;
		c->poked = 0;
		c->state = CHECKPOINTER_RUNNING;
		pthread_mutex_unlock(&c->lock);
		checkpointer_run(c);
		pthread_mutex_lock(&c->lock);
		c->count++;
		if (c->state == CHECKPOINTER_RUNNING)
			c->state = CHECKPOINTER_IDLE;
	}
	pthread_mutex_unlock(&c->lock);
	return NULL;
}

struct checkpointer *
checkpointer_new(const char *path, char **err)
{
	struct checkpointer *c = calloc(1, sizeof *c);

	*err = NULL;
	if (!c)
		return NULL;
	/* No SQLITE_OPEN_CREATE: the writer made the file; a missing one is
	 * an error, not a new empty database. */
	if (sqlite3_open_v2(path, &c->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX,
	    NULL) != SQLITE_OK ||
	    /* The checkpoint syncs the log before it overwrites the database
	     * and the database before the log may restart: synchronous=NORMAL
	     * is what makes it do both. */
	    sqlite3_exec(c->db, "PRAGMA synchronous=NORMAL", NULL, NULL, NULL) != SQLITE_OK ||
	    sqlite3_exec(c->db, "PRAGMA wal_autocheckpoint=0", NULL, NULL, NULL) != SQLITE_OK) {
		if (asprintf(err, "cannot open %s for checkpoints: %s", path,
		    c->db ? sqlite3_errmsg(c->db) : "out of memory") < 0)
			*err = NULL;
		sqlite3_close(c->db);
		free(c);
		return NULL;
	}
	pthread_mutex_init(&c->lock, NULL);
	pthread_cond_init(&c->wake, NULL);
	if (pthread_create(&c->thread, NULL, checkpointer_main, c) != 0) {
		if (asprintf(err, "cannot start the checkpoint thread") < 0)
			*err = NULL;
		pthread_cond_destroy(&c->wake);
		pthread_mutex_destroy(&c->lock);
		sqlite3_close(c->db);
		free(c);
		return NULL;
	}
	return c;
}

void
checkpointer_poke(struct checkpointer *c)
{
	pthread_mutex_lock(&c->lock);
	if (!c->poked) {
		c->poked = 1;
		pthread_cond_signal(&c->wake);
	}
	pthread_mutex_unlock(&c->lock);
}

unsigned long
checkpointer_count(struct checkpointer *c)
{
	unsigned long n;

	pthread_mutex_lock(&c->lock);
	n = c->count;
	pthread_mutex_unlock(&c->lock);
	return n;
}

void
checkpointer_free(struct checkpointer *c)
{
	if (!c)
		return;
	pthread_mutex_lock(&c->lock);
	c->state = CHECKPOINTER_STOPPING;
	pthread_cond_signal(&c->wake);
	pthread_mutex_unlock(&c->lock);
	pthread_join(c->thread, NULL);
	pthread_cond_destroy(&c->wake);
	pthread_mutex_destroy(&c->lock);
	sqlite3_close(c->db);
	free(c);
}
