/*
 * An in-memory saga instance and its encoding in the store (the opaque
 * blob of struct saga_rec): msgpack, checked before and while it is
 * decoded, since a record may be damaged or foreign (fuzz_saga_record);
 * loading and saving it through saga_store.h, which keeps the per-state
 * counts of the metrics up to date as it goes.
 */
#include <msgpack.h>
#include <stdlib.h>
#include <string.h>

#include "conf.h"
#include "props.h"
#include "log.h"
#include "saga_data.h"
#include "saga_int.h"
#include "sagad.h"
#include "trace.h"
#include "util.h"
#include "xmalloc.h"

/* ---- instance encoding ---- */

static void
saga_pack_str(msgpack_packer *pk, const char *s)
{
	if (!s) {
		msgpack_pack_nil(pk);
		return;
	}
	msgpack_pack_str(pk, strlen(s));
	msgpack_pack_str_body(pk, s, strlen(s));
}

static void
saga_pack_bin(msgpack_packer *pk, const char *b, size_t n)
{
	msgpack_pack_bin(pk, n);
	msgpack_pack_bin_body(pk, b ? b : "", n);
}

void
saga_pack(const struct saga_inst *in, msgpack_sbuffer *sb)
{
	msgpack_packer pk;
	size_t i;

	msgpack_sbuffer_init(sb);
	msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
	msgpack_pack_array(&pk, 10);
	msgpack_pack_int(&pk, in->state);
	msgpack_pack_unsigned_int(&pk, in->cur);
	msgpack_pack_unsigned_int(&pk, in->order);
	saga_pack_bin(&pk, in->body, in->body_len);
	saga_pack_str(&pk, in->ct);
	saga_pack_str(&pk, in->reason);
	msgpack_pack_array(&pk, in->def->n_steps);
	for (i = 0; i < in->def->n_steps; i++) {
		const struct saga_step_rt *s = &in->steps[i];
		msgpack_pack_array(&pk, 8);
		msgpack_pack_int(&pk, s->state);
		msgpack_pack_unsigned_int(&pk, s->attempts);
		msgpack_pack_unsigned_int(&pk, s->comp_attempts);
		msgpack_pack_unsigned_int(&pk, s->order);
		saga_pack_bin(&pk, s->body, s->body_len);
		saga_pack_str(&pk, s->ct);
		msgpack_pack_double(&pk, s->sent_at);	/* 7: since 0.2 */
		msgpack_pack_unsigned_int(&pk, s->comp_sends);	/* 8: since 0.3 */
	}
	saga_pack_str(&pk, in->trace_parent);	/* 8 and 9: since 0.2 */
	saga_pack_str(&pk, in->trace_state);
	saga_pack_str(&pk, in->version);	/* 10: since 0.3 */
}

int
saga_peek_version(const char *buf, size_t len, char out[16 + 1])
{
	msgpack_unpacked u;
	const msgpack_object *v;
	size_t off = 0;
	int rc = -1;

	if (!props_msgpack_sane(buf, len))
		return -1;
	msgpack_unpacked_init(&u);
	if (msgpack_unpack_next(&u, buf, len, &off) == MSGPACK_UNPACK_SUCCESS &&
	    u.data.type == MSGPACK_OBJECT_ARRAY) {
		rc = 0;
		if (u.data.via.array.size == 10) {
			v = &u.data.via.array.ptr[9];
			rc = v->type == MSGPACK_OBJECT_STR && v->via.str.size == 16 ? 1 : -1;
			if (rc == 1) {
				memcpy(out, v->via.str.ptr, 16);
				out[16] = '\0';
			}
		}
	}
	msgpack_unpacked_destroy(&u);
	return rc;
}

static char *
saga_obj_str(const msgpack_object *o)
{
	if (o->type != MSGPACK_OBJECT_STR)
		return NULL;
	/* msgpack-c gives an empty string a NULL pointer. */
	return o->via.str.size ? xstrndup(o->via.str.ptr, o->via.str.size) : xstrdup("");
}

static char *
saga_obj_bin(const msgpack_object *o, size_t *len)
{
	char *b;

	*len = 0;
	if (o->type != MSGPACK_OBJECT_BIN)
		return NULL;
	b = xmalloc(o->via.bin.size + 1);
	if (o->via.bin.size)
		memcpy(b, o->via.bin.ptr, o->via.bin.size);
	*len = o->via.bin.size;
	return b;
}

static int
saga_obj_uint(const msgpack_object *o, unsigned max, unsigned *out)
{
	if (o->type != MSGPACK_OBJECT_POSITIVE_INTEGER || o->via.u64 > max)
		return -1;
	*out = (unsigned)o->via.u64;
	return 0;
}

/* The trace context of a record written since 0.2 (nil in both when it
 * had none); a record of 0.1 has neither. */
static int
saga_unpack_trace(struct saga_inst *in, const msgpack_object *tp, const msgpack_object *ts)
{
	if (tp->type == MSGPACK_OBJECT_NIL)
		return ts->type == MSGPACK_OBJECT_NIL ? 0 : -1;
	in->trace_parent = saga_obj_str(tp);
	if (!in->trace_parent || !trace_parent_valid(in->trace_parent))
		return -1;
	if (ts->type == MSGPACK_OBJECT_NIL)
		return 0;
	in->trace_state = saga_obj_str(ts);
	return in->trace_state && trace_state_valid(in->trace_state) ? 0 : -1;
}

/* Decode a stored instance; -1 on anything malformed (damage). */
int
saga_unpack(struct saga_inst *in, const char *buf, size_t len)
{
	msgpack_unpacked u;
	const msgpack_object *a, *steps;
	size_t off = 0, i;
	unsigned v;
	int rc = -1;

	if (!props_msgpack_sane(buf, len))
		return -1;
	msgpack_unpacked_init(&u);
	if (msgpack_unpack_next(&u, buf, len, &off) != MSGPACK_UNPACK_SUCCESS ||
	    u.data.type != MSGPACK_OBJECT_ARRAY ||
	    (u.data.via.array.size != 7 && u.data.via.array.size != 9 &&
	    u.data.via.array.size != 10))
		goto out;
	a = u.data.via.array.ptr;
	if (saga_obj_uint(&a[0], SAGA_NSTATES - 1, &v) < 0)
		goto out;
	in->state = v;
	if (saga_obj_uint(&a[1], 1u << 30, &in->cur) < 0 ||
	    saga_obj_uint(&a[2], 1u << 30, &in->order) < 0)
		goto out;
	in->body = saga_obj_bin(&a[3], &in->body_len);
	in->ct = saga_obj_str(&a[4]);
	in->reason = saga_obj_str(&a[5]);
	steps = &a[6];
	if (steps->type != MSGPACK_OBJECT_ARRAY || steps->via.array.size != in->def->n_steps)
		goto out;
	for (i = 0; i < in->def->n_steps; i++) {
		const msgpack_object *s = &steps->via.array.ptr[i];
		struct saga_step_rt *st = &in->steps[i];
		if (s->type != MSGPACK_OBJECT_ARRAY ||
		    s->via.array.size < 6 || s->via.array.size > 8 ||
		    saga_obj_uint(&s->via.array.ptr[0], STEP_NSTATES - 1, &v) < 0)
			goto out;
		st->state = v;
		if (saga_obj_uint(&s->via.array.ptr[1], 1u << 30, &st->attempts) < 0 ||
		    saga_obj_uint(&s->via.array.ptr[2], 1u << 30, &st->comp_attempts) < 0 ||
		    saga_obj_uint(&s->via.array.ptr[3], 1u << 30, &st->order) < 0)
			goto out;
		if (s->via.array.ptr[4].type == MSGPACK_OBJECT_BIN)
			st->body = saga_obj_bin(&s->via.array.ptr[4], &st->body_len);
		st->ct = saga_obj_str(&s->via.array.ptr[5]);
		if (s->via.array.size >= 7) {
			if (s->via.array.ptr[6].type != MSGPACK_OBJECT_FLOAT64)
				goto out;
			st->sent_at = s->via.array.ptr[6].via.f64;
		}
		if (s->via.array.size == 8 &&
		    saga_obj_uint(&s->via.array.ptr[7], 1u << 30, &st->comp_sends) < 0)
			goto out;
	}
	if (in->cur > in->def->n_steps)
		goto out;
	if (u.data.via.array.size >= 9 && saga_unpack_trace(in, &a[7], &a[8]) < 0)
		goto out;
	rc = 0;
out:
	msgpack_unpacked_destroy(&u);
	return rc;
}

struct saga_inst *
saga_inst_new(const struct saga_version *v, const char *id)
{
	struct saga_inst *in = xcalloc(1, sizeof *in);

	in->def = v->def;
	in->version = v->version;
	in->def_index = v->def_index;
	in->id = xstrdup(id);
	in->steps = xcalloc(in->def->n_steps + 1, sizeof *in->steps);
	return in;
}

void
saga_inst_free(struct saga_inst *in)
{
	size_t i;

	if (!in)
		return;
	for (i = 0; i < in->def->n_steps; i++) {
		free(in->steps[i].body);
		free(in->steps[i].ct);
	}
	free(in->steps);
	free(in->id);
	free(in->body);
	free(in->ct);
	free(in->reason);
	free(in->trace_parent);
	free(in->trace_state);
	free(in);
}

/* ---- data for the steps (saga_data.h) ---- */

/* A step's reply: that of a step which succeeded (and may be undone since)
 * with a reply or an event; a notification or compensation-only step has
 * none. */
static int
saga_reply_of(void *arg, const char *step, const char **body, size_t *len)
{
	const struct saga_inst *in = arg;
	size_t i;

	for (i = 0; i < in->def->n_steps; i++) {
		const struct conf_saga_step *cs = &in->def->steps[i];
		enum saga_step_state s = in->steps[i].state;
		if (strcmp(cs->name, step) != 0)
			continue;
		if (cs->notify || (!cs->command.exchange && !cs->success.exchange) ||
		    (s != STEP_SUCCEEDED && s != STEP_COMPENSATING && s != STEP_COMPENSATED))
			return 0;
		*body = in->steps[i].body;
		*len = in->steps[i].body_len;
		return 1;
	}
	return 0;
}

void
saga_data_of(const struct saga_inst *in, struct saga_data_src *src)
{
	memset(src, 0, sizeof *src);
	src->saga_id = in->id;
	src->saga_name = in->def->name;
	src->start = in->body;
	src->start_len = in->body_len;
	src->reply = saga_reply_of;
	src->arg = (void *)in;
}

/* ---- persistence ---- */

ssize_t
saga_def_index(const struct sagad_conf *c, const char *name)
{
	size_t i;

	for (i = 0; i < c->n_sagas; i++)
		if (strcmp(c->sagas[i].name, name) == 0)
			return (ssize_t)i;
	return -1;
}

/* The instance a stored record holds, on the version of its definition it
 * started with, or NULL: its saga is gone from the configuration, or the
 * record is damaged (logged). */
struct saga_inst *
saga_from_rec(struct saga_engine *e, const struct saga_rec *r)
{
	ssize_t def = saga_def_index(e->d->conf, r->saga);
	const struct saga_version *v = NULL;
	struct saga_inst *in;
	char version[16 + 1];
	int has;

	if (def < 0)
		return NULL;
	has = saga_peek_version(r->data, r->data_len, version);
	if (has >= 0)
		v = saga_version_find(e, (size_t)def, has ? version : NULL);
	if (!v) {
		log_error(has < 0 ? "damaged saga instance in store, ignored" :
		    "saga instance of a definition version the store lacks, ignored",
		    LOG_STR("saga", r->saga), LOG_STR("id", r->id),
		    LOG_STR("version", has > 0 ? version : ""));
		return NULL;
	}
	in = saga_inst_new(v, r->id);
	in->row = r->row;
	in->started_at = r->started_at;
	in->updated_at = r->updated_at;
	in->finished_at = r->finished_at;
	if (saga_unpack(in, r->data, r->data_len) < 0) {
		log_error("damaged saga instance in store, ignored", LOG_STR("saga", r->saga),
		    LOG_STR("id", r->id));
		saga_inst_free(in);
		return NULL;
	}
	in->loaded = in->state;
	return in;
}

struct saga_inst *
saga_load(struct saga_engine *e, size_t def, const char *id)
{
	struct saga_rec r;
	struct saga_inst *in = NULL;

	if (saga_store_get(e->ss, e->d->conf->sagas[def].name, id, &r) == 1)
		in = saga_from_rec(e, &r);
	saga_rec_clear(&r);
	return in;
}

struct saga_inst *
saga_load_row(struct saga_engine *e, int64_t row)
{
	struct saga_rec r;
	struct saga_inst *in = NULL;

	if (saga_store_get_row(e->ss, row, &r) == 1)
		in = saga_from_rec(e, &r);
	saga_rec_clear(&r);
	return in;
}

void
saga_save(struct saga_engine *e, struct saga_inst *in)
{
	struct saga_stats *st = &e->stats[in->def_index];
	struct saga_rec r = { 0 };
	msgpack_sbuffer sb;
	int rc;

	saga_pack(in, &sb);
	r.row = in->row;
	r.saga = (char *)in->def->name;
	r.id = in->id;
	r.state = in->state;
	r.started_at = in->started_at;
	r.updated_at = util_now();
	r.finished_at = saga_finished(in->state) || in->state == SAGA_FAILED ? r.updated_at : 0;
	r.data = sb.data;
	r.data_len = sb.size;
	if (!in->row) {
		rc = saga_store_insert(e->ss, &r);
		if (rc == 0) {
			in->row = r.row;
			st->states[in->state]++;
			in->loaded = in->state;
		}
	} else if (saga_store_update(e->ss, &r) == 0 && in->loaded != in->state) {
		st->states[in->loaded]--;
		st->states[in->state]++;
		in->loaded = in->state;
	}
	msgpack_sbuffer_destroy(&sb);
}

/* One line of the instance's history (sagactl saga ID). */
void
saga_log(struct saga_engine *e, struct saga_inst *in, const char *dir, const char *what,
    const char *step, const char *message_id, const char *detail)
{
	if (!in->row)
		saga_save(e, in);
	if (in->row)
		saga_store_log(e->ss, in->row, util_now(), dir, what, step, message_id, detail);
}
