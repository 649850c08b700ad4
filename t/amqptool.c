/*
 * amqptool - a small AMQP 0-9-1 peer for sagad's integration tests and
 * benchmarks (rabbitmq-c 0.11 + jansson).
 *
 *   amqptool URL ping
 *   amqptool URL declare QUEUE [EXCHANGE:BINDINGKEY ...]
 *   amqptool URL consume QUEUE COUNT TIMEOUT_SECONDS
 *   amqptool URL count QUEUE
 *   amqptool URL purge QUEUE
 *   amqptool URL delete QUEUE
 *   amqptool URL xdelete EXCHANGE
 *   amqptool URL publish EXCHANGE KEY BODY [MESSAGE_ID]
 *   amqptool URL send JSON
 *
 * `send` publishes with every property under the caller's control (JSON
 * object; every key optional except exchange and key):
 *   exchange, key            "-" or "" is the default exchange
 *   body | body_hex | body_size (bytes 'a'..'z' repeated)
 *   message_id | message_id_hex, correlation_id, reply_to, type,
 *   content_type | content_type_hex, expiration
 *   timestamp                Unix seconds (default now; false: none)
 *   persistent               default true (delivery_mode 2)
 *   headers                  {"name": value}: a string is a longstr, an
 *                            integer int64, true/false a boolean, null void,
 *                            an array an array, an object a nested table,
 *                            except {"$hex": "..."} (byte array, kind 'x')
 *                            and {"$str_hex": "..."} (longstr of raw bytes)
 *   count                    publish that many (default 1); "{n}" in key,
 *                            body, message_id and correlation_id becomes the
 *                            index (0-based)
 * It waits for the broker to confirm every message and prints how many
 * were published.
 *
 * An exchange named "-" (or "") is the default exchange. `consume` prints
 * one JSON object per message and line. Errors go to stderr, exit status 1;
 * usage errors exit 2.
 */
#ifdef HAVE_CONFIG_H
#include <config.h>
#endif
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include "amqp_headers.h"
#include <jansson.h>

#define CH 1

static const char *prog = "amqptool";

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "%s: ", prog);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  exit(1);
}

static void usage(void) __attribute__((noreturn));
static void usage(void) {
  fprintf(stderr,
          "usage: %s URL ping\n"
          "       %s URL declare QUEUE [EXCHANGE:BINDINGKEY ...]\n"
          "       %s URL consume QUEUE COUNT TIMEOUT_SECONDS\n"
          "       %s URL count QUEUE\n"
          "       %s URL purge QUEUE\n"
          "       %s URL delete QUEUE\n"
          "       %s URL xdelete EXCHANGE\n"
          "       %s URL publish EXCHANGE KEY BODY [MESSAGE_ID]\n"
          "       %s URL send JSON\n",
          prog, prog, prog, prog, prog, prog, prog, prog, prog);
  exit(2);
}

/* Describe an RPC reply; returns NULL when it is a success. */
static const char *reply_error(amqp_rpc_reply_t r, char *buf, size_t len) {
  switch (r.reply_type) {
  case AMQP_RESPONSE_NORMAL:
    return NULL;
  case AMQP_RESPONSE_NONE:
    snprintf(buf, len, "missing RPC reply");
    break;
  case AMQP_RESPONSE_LIBRARY_EXCEPTION:
    snprintf(buf, len, "%s", amqp_error_string2(r.library_error));
    break;
  case AMQP_RESPONSE_SERVER_EXCEPTION:
    if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
      amqp_connection_close_t *m = r.reply.decoded;
      snprintf(buf, len, "connection closed by broker: %u %.*s", m->reply_code,
               (int)m->reply_text.len, (char *)m->reply_text.bytes);
    } else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
      amqp_channel_close_t *m = r.reply.decoded;
      snprintf(buf, len, "channel closed by broker: %u %.*s", m->reply_code,
               (int)m->reply_text.len, (char *)m->reply_text.bytes);
    } else {
      snprintf(buf, len, "unexpected server method 0x%08x", r.reply.id);
    }
    break;
  default:
    snprintf(buf, len, "unknown reply type %d", (int)r.reply_type);
  }
  return buf;
}

static void check_reply(amqp_rpc_reply_t r, const char *what) {
  char buf[512];
  const char *e = reply_error(r, buf, sizeof buf);
  if (e)
    die("%s: %s", what, e);
}

static int is_channel_close(amqp_rpc_reply_t r) {
  return r.reply_type == AMQP_RESPONSE_SERVER_EXCEPTION &&
         r.reply.id == AMQP_CHANNEL_CLOSE_METHOD;
}

static amqp_connection_state_t conn;
static int channel = CH;

static void open_channel(void) {
  amqp_channel_open(conn, channel);
  check_reply(amqp_get_rpc_reply(conn), "channel.open");
}

/* After the broker closed our channel: acknowledge, and open a new one. */
static void recover_channel(void) {
  amqp_channel_close_ok_t ok;
  memset(&ok, 0, sizeof ok);
  amqp_send_method(conn, channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok);
  channel++;
  open_channel();
}

static void connect_broker(const char *url_in) {
  struct amqp_connection_info ci;
  char *url = strdup(url_in);
  struct timeval tv;
  int rc;

  if (!url)
    die("out of memory");
  amqp_default_connection_info(&ci);
  rc = amqp_parse_url(url, &ci);
  if (rc != AMQP_STATUS_OK)
    die("bad URL: %s", amqp_error_string2(rc));
  if (ci.ssl)
    die("amqps:// is not supported by this tool");

  conn = amqp_new_connection();
  if (!conn)
    die("out of memory");
  amqp_socket_t *sock = amqp_tcp_socket_new(conn);
  if (!sock)
    die("cannot create a TCP socket");
  tv.tv_sec = 5;
  tv.tv_usec = 0;
  rc = amqp_socket_open_noblock(sock, ci.host, ci.port, &tv);
  if (rc != AMQP_STATUS_OK)
    die("cannot connect to %s:%d: %s", ci.host, ci.port, amqp_error_string2(rc));
  amqp_set_handshake_timeout(conn, &tv);
  tv.tv_sec = 15;
  amqp_set_rpc_timeout(conn, &tv);
  check_reply(amqp_login(conn, ci.vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN,
                         ci.user, ci.password),
              "login");
  open_channel();
  free(url);
}

static void disconnect_broker(void) {
  amqp_channel_close(conn, channel, AMQP_REPLY_SUCCESS);
  amqp_connection_close(conn, AMQP_REPLY_SUCCESS);
  amqp_destroy_connection(conn);
}

static const char *exchange_name(const char *s) {
  return strcmp(s, "-") == 0 ? "" : s;
}

/* ---- declare ---------------------------------------------------------- */

static void cmd_declare(const char *queue, int nbind, char **binds) {
  amqp_queue_declare(conn, channel, amqp_cstring_bytes(queue), 0, 1, 0, 0,
                     amqp_empty_table);
  check_reply(amqp_get_rpc_reply(conn), "queue.declare");
  for (int i = 0; i < nbind; i++) {
    char *spec = strdup(binds[i]);
    char *colon = spec ? strchr(spec, ':') : NULL;
    if (!colon)
      die("bad binding '%s': expected EXCHANGE:BINDINGKEY", binds[i]);
    *colon = '\0';
    const char *ex = exchange_name(spec);
    const char *key = colon + 1;
    if (*ex == '\0')
      die("bad binding '%s': the default exchange cannot be bound", binds[i]);
    if (strncmp(ex, "amq.", 4) != 0) {
      /* Idempotent when the exchange exists as a durable topic exchange;
       * when it exists with other properties the broker refuses (406):
       * keep the existing exchange and go on binding. */
      amqp_exchange_declare(conn, channel, amqp_cstring_bytes(ex),
                            amqp_cstring_bytes("topic"), 0, 1, 0, 0,
                            amqp_empty_table);
      amqp_rpc_reply_t r = amqp_get_rpc_reply(conn);
      if (is_channel_close(r)) {
        char buf[512];
        fprintf(stderr, "%s: warning: exchange.declare %s: %s (using it as it is)\n",
                prog, ex, reply_error(r, buf, sizeof buf));
        recover_channel();
      } else {
        check_reply(r, "exchange.declare");
      }
    }
    amqp_queue_bind(conn, channel, amqp_cstring_bytes(queue),
                    amqp_cstring_bytes(ex), amqp_cstring_bytes(key),
                    amqp_empty_table);
    check_reply(amqp_get_rpc_reply(conn), "queue.bind");
    free(spec);
  }
}

/* ---- consume ---------------------------------------------------------- */

static json_t *bytes_json(amqp_bytes_t b) {
  return json_stringn(b.bytes ? (const char *)b.bytes : "", b.len);
}

static char *base64(const unsigned char *p, size_t n) {
  static const char tab[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  char *out = malloc(4 * ((n + 2) / 3) + 1), *o = out;
  size_t i;
  if (!out)
    die("out of memory");
  for (i = 0; i + 2 < n; i += 3) {
    *o++ = tab[p[i] >> 2];
    *o++ = tab[((p[i] & 3) << 4) | (p[i + 1] >> 4)];
    *o++ = tab[((p[i + 1] & 15) << 2) | (p[i + 2] >> 6)];
    *o++ = tab[p[i + 2] & 63];
  }
  if (n - i == 1) {
    *o++ = tab[p[i] >> 2];
    *o++ = tab[(p[i] & 3) << 4];
    *o++ = '=';
    *o++ = '=';
  } else if (n - i == 2) {
    *o++ = tab[p[i] >> 2];
    *o++ = tab[((p[i] & 3) << 4) | (p[i + 1] >> 4)];
    *o++ = tab[(p[i + 1] & 15) << 2];
    *o++ = '=';
  }
  *o = '\0';
  return out;
}

static json_t *field_json(const amqp_field_value_t *v);

static json_t *table_json(const amqp_table_t *t) {
  json_t *o = json_object();
  for (int i = 0; i < t->num_entries; i++) {
    const amqp_table_entry_t *e = &t->entries[i];
    char *k = strndup(e->key.bytes ? (const char *)e->key.bytes : "", e->key.len);
    json_t *v = field_json(&e->value);
    if (!k || !v)
      die("out of memory");
    json_object_set_new(o, k, v);
    free(k);
  }
  return o;
}

/* Strings as strings; every other value stringified (tables and arrays as
 * their JSON text). */
static json_t *field_json(const amqp_field_value_t *v) {
  char buf[64];
  switch (v->kind) {
  case AMQP_FIELD_KIND_UTF8:
  case AMQP_FIELD_KIND_BYTES: {
    json_t *s = bytes_json(v->value.bytes);
    if (s)
      return s;
    char *b = base64(v->value.bytes.bytes, v->value.bytes.len);
    s = json_string(b);
    free(b);
    return s;
  }
  case AMQP_FIELD_KIND_BOOLEAN:
    return json_string(v->value.boolean ? "true" : "false");
  case AMQP_FIELD_KIND_I8: snprintf(buf, sizeof buf, "%d", v->value.i8); break;
  case AMQP_FIELD_KIND_U8: snprintf(buf, sizeof buf, "%u", v->value.u8); break;
  case AMQP_FIELD_KIND_I16: snprintf(buf, sizeof buf, "%d", v->value.i16); break;
  case AMQP_FIELD_KIND_U16: snprintf(buf, sizeof buf, "%u", v->value.u16); break;
  case AMQP_FIELD_KIND_I32: snprintf(buf, sizeof buf, "%" PRId32, v->value.i32); break;
  case AMQP_FIELD_KIND_U32: snprintf(buf, sizeof buf, "%" PRIu32, v->value.u32); break;
  case AMQP_FIELD_KIND_I64: snprintf(buf, sizeof buf, "%" PRId64, v->value.i64); break;
  case AMQP_FIELD_KIND_U64:
  case AMQP_FIELD_KIND_TIMESTAMP:
    snprintf(buf, sizeof buf, "%" PRIu64, v->value.u64);
    break;
  case AMQP_FIELD_KIND_F32: snprintf(buf, sizeof buf, "%g", (double)v->value.f32); break;
  case AMQP_FIELD_KIND_F64: snprintf(buf, sizeof buf, "%g", v->value.f64); break;
  case AMQP_FIELD_KIND_DECIMAL:
    snprintf(buf, sizeof buf, "%" PRIu32 "e-%u", v->value.decimal.value,
             (unsigned)v->value.decimal.decimals);
    break;
  case AMQP_FIELD_KIND_VOID:
    return json_string("");
  case AMQP_FIELD_KIND_TABLE:
  case AMQP_FIELD_KIND_ARRAY: {
    json_t *j;
    if (v->kind == AMQP_FIELD_KIND_TABLE) {
      j = table_json(&v->value.table);
    } else {
      j = json_array();
      for (int i = 0; i < v->value.array.num_entries; i++)
        json_array_append_new(j, field_json(&v->value.array.entries[i]));
    }
    char *s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    json_t *r = json_string(s ? s : "");
    free(s);
    json_decref(j);
    return r;
  }
  default:
    snprintf(buf, sizeof buf, "<field kind %c>", v->kind);
  }
  return json_string(buf);
}

static void set_bytes(json_t *o, const char *key, amqp_bytes_t b) {
  json_t *s = bytes_json(b);
  if (!s) { /* not UTF-8: keep it readable */
    char *enc = base64(b.bytes, b.len);
    char k[64];
    snprintf(k, sizeof k, "%s_b64", key);
    json_object_set_new(o, k, json_string(enc));
    free(enc);
    return;
  }
  json_object_set_new(o, key, s);
}

static json_t *envelope_json(const amqp_envelope_t *env) {
  json_t *o = json_object();
  const amqp_basic_properties_t *p = &env->message.properties;
  amqp_flags_t f = p->_flags;

  set_bytes(o, "exchange", env->exchange);
  set_bytes(o, "routing_key", env->routing_key);
  json_object_set_new(o, "redelivered", json_boolean(env->redelivered));
  if (f & AMQP_BASIC_CONTENT_TYPE_FLAG)
    set_bytes(o, "content_type", p->content_type);
  if (f & AMQP_BASIC_CONTENT_ENCODING_FLAG)
    set_bytes(o, "content_encoding", p->content_encoding);
  if (f & AMQP_BASIC_DELIVERY_MODE_FLAG)
    json_object_set_new(o, "delivery_mode", json_integer(p->delivery_mode));
  if (f & AMQP_BASIC_PRIORITY_FLAG)
    json_object_set_new(o, "priority", json_integer(p->priority));
  if (f & AMQP_BASIC_MESSAGE_ID_FLAG)
    set_bytes(o, "message_id", p->message_id);
  if (f & AMQP_BASIC_CORRELATION_ID_FLAG)
    set_bytes(o, "correlation_id", p->correlation_id);
  if (f & AMQP_BASIC_REPLY_TO_FLAG)
    set_bytes(o, "reply_to", p->reply_to);
  if (f & AMQP_BASIC_EXPIRATION_FLAG)
    set_bytes(o, "expiration", p->expiration);
  if (f & AMQP_BASIC_TIMESTAMP_FLAG)
    json_object_set_new(o, "timestamp", json_integer((json_int_t)p->timestamp));
  if (f & AMQP_BASIC_TYPE_FLAG)
    set_bytes(o, "type", p->type);
  if (f & AMQP_BASIC_USER_ID_FLAG)
    set_bytes(o, "user_id", p->user_id);
  if (f & AMQP_BASIC_APP_ID_FLAG)
    set_bytes(o, "app_id", p->app_id);
  if (f & AMQP_BASIC_HEADERS_FLAG)
    json_object_set_new(o, "headers", table_json(&p->headers));
  set_bytes(o, "body", env->message.body);
  return o;
}

static void cmd_consume(const char *queue, long count, double timeout) {
  long got = 0;

  amqp_basic_qos(conn, channel, 0, 1000, 0);
  check_reply(amqp_get_rpc_reply(conn), "basic.qos");
  amqp_basic_consume(conn, channel, amqp_cstring_bytes(queue), amqp_empty_bytes,
                     0, 0, 0, amqp_empty_table);
  check_reply(amqp_get_rpc_reply(conn), "basic.consume");

  while (got < count) {
    amqp_envelope_t env;
    struct timeval tv;
    tv.tv_sec = (time_t)timeout;
    tv.tv_usec = (suseconds_t)((timeout - (double)tv.tv_sec) * 1e6);
    amqp_maybe_release_buffers(conn);
    amqp_rpc_reply_t r = amqp_consume_message(conn, &env, &tv, 0);
    if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
        r.library_error == AMQP_STATUS_TIMEOUT)
      break;
    if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
        r.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
      /* A method other than basic.deliver: find out which. */
      amqp_frame_t frame;
      if (amqp_simple_wait_frame(conn, &frame) != AMQP_STATUS_OK)
        die("consume: connection lost");
      if (frame.frame_type == AMQP_FRAME_METHOD) {
        if (frame.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD) {
          amqp_channel_close_t *m = frame.payload.method.decoded;
          die("consume: channel closed by broker: %u %.*s", m->reply_code,
              (int)m->reply_text.len, (char *)m->reply_text.bytes);
        }
        if (frame.payload.method.id == AMQP_CONNECTION_CLOSE_METHOD) {
          amqp_connection_close_t *m = frame.payload.method.decoded;
          die("consume: connection closed by broker: %u %.*s", m->reply_code,
              (int)m->reply_text.len, (char *)m->reply_text.bytes);
        }
        if (frame.payload.method.id == AMQP_BASIC_CANCEL_METHOD)
          die("consume: consumer cancelled by broker (queue deleted?)");
      }
      continue; /* heartbeats and the like */
    }
    check_reply(r, "consume");

    json_t *o = envelope_json(&env);
    char *line = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
    if (!line)
      die("out of memory");
    puts(line);
    free(line);
    json_decref(o);
    int rc = amqp_basic_ack(conn, channel, env.delivery_tag, 0);
    amqp_destroy_envelope(&env);
    if (rc != AMQP_STATUS_OK)
      die("basic.ack: %s", amqp_error_string2(rc));
    got++;
  }
  fflush(stdout);
}

/* ---- count / purge / delete ------------------------------------------ */

static void cmd_count(const char *queue) {
  amqp_queue_declare_ok_t *ok =
      amqp_queue_declare(conn, channel, amqp_cstring_bytes(queue), 1, 0, 0, 0,
                         amqp_empty_table);
  check_reply(amqp_get_rpc_reply(conn), "queue.declare (passive)");
  printf("%" PRIu32 "\n", ok->message_count);
}

static void cmd_purge(const char *queue) {
  amqp_queue_purge_ok_t *ok =
      amqp_queue_purge(conn, channel, amqp_cstring_bytes(queue));
  check_reply(amqp_get_rpc_reply(conn), "queue.purge");
  printf("%" PRIu32 "\n", ok->message_count);
}

static void cmd_delete(const char *queue) {
  amqp_queue_delete_ok_t *ok =
      amqp_queue_delete(conn, channel, amqp_cstring_bytes(queue), 0, 0);
  check_reply(amqp_get_rpc_reply(conn), "queue.delete");
  printf("%" PRIu32 "\n", ok->message_count);
}

static void cmd_xdelete(const char *exchange) {
  amqp_exchange_delete(conn, channel, amqp_cstring_bytes(exchange), 0);
  check_reply(amqp_get_rpc_reply(conn), "exchange.delete");
}

/* ---- publish ---------------------------------------------------------- */

static void cmd_publish(const char *exchange, const char *key, const char *body,
                        const char *message_id) {
  amqp_basic_properties_t props;
  memset(&props, 0, sizeof props);
  props._flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_TIMESTAMP_FLAG |
                 AMQP_BASIC_APP_ID_FLAG;
  props.delivery_mode = 2;
  props.timestamp = (uint64_t)time(NULL);
  props.app_id = amqp_cstring_bytes("amqptool");
  if (message_id) {
    props._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
    props.message_id = amqp_cstring_bytes(message_id);
  }

  amqp_confirm_select(conn, channel);
  check_reply(amqp_get_rpc_reply(conn), "confirm.select");
  int rc = amqp_basic_publish(conn, channel, amqp_cstring_bytes(exchange_name(exchange)),
                              amqp_cstring_bytes(key), 0, 0, &props,
                              amqp_cstring_bytes(body));
  if (rc != AMQP_STATUS_OK)
    die("basic.publish: %s", amqp_error_string2(rc));

  for (;;) {
    amqp_frame_t frame;
    struct timeval tv = {15, 0};
    rc = amqp_simple_wait_frame_noblock(conn, &frame, &tv);
    if (rc == AMQP_STATUS_TIMEOUT)
      die("publish: no confirm within 15 s");
    if (rc != AMQP_STATUS_OK)
      die("publish: %s", amqp_error_string2(rc));
    if (frame.frame_type != AMQP_FRAME_METHOD)
      continue;
    switch (frame.payload.method.id) {
    case AMQP_BASIC_ACK_METHOD:
      return;
    case AMQP_BASIC_NACK_METHOD:
      die("publish: the broker nacked the message");
    case AMQP_CHANNEL_CLOSE_METHOD: {
      amqp_channel_close_t *m = frame.payload.method.decoded;
      die("publish: channel closed by broker: %u %.*s", m->reply_code,
          (int)m->reply_text.len, (char *)m->reply_text.bytes);
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
      amqp_connection_close_t *m = frame.payload.method.decoded;
      die("publish: connection closed by broker: %u %.*s", m->reply_code,
          (int)m->reply_text.len, (char *)m->reply_text.bytes);
    }
    default:
      break;
    }
  }
}


/* ---- send ------------------------------------------------------------- */

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static amqp_bytes_t hex_bytes(const char *hex) {
  size_t n = strlen(hex), i;
  amqp_bytes_t b;
  if (n % 2)
    die("odd-length hex string '%s'", hex);
  b.len = n / 2;
  b.bytes = malloc(b.len ? b.len : 1);
  if (!b.bytes)
    die("out of memory");
  for (i = 0; i < b.len; i++) {
    int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
    if (hi < 0 || lo < 0)
      die("bad hex string '%s'", hex);
    ((unsigned char *)b.bytes)[i] = (unsigned char)(hi * 16 + lo);
  }
  return b;
}

/* s with every "{n}" replaced by the number n (a new string). */
static char *subst(const char *s, long n) {
  char num[32];
  size_t cap = strlen(s) + 1, len = 0;
  char *out;
  int nl = snprintf(num, sizeof num, "%ld", n);
  const char *p;
  for (p = s; (p = strstr(p, "{n}")); p += 3)
    cap += (size_t)nl;
  out = malloc(cap);
  if (!out)
    die("out of memory");
  for (p = s; *p;) {
    if (strncmp(p, "{n}", 3) == 0) {
      memcpy(out + len, num, (size_t)nl);
      len += (size_t)nl;
      p += 3;
    } else {
      out[len++] = *p++;
    }
  }
  out[len] = '\0';
  return out;
}

static void field_from_json(json_t *v, amqp_field_value_t *f);

/* What the header tables of one message allocate, freed after its publish
 * (a sanitizer build counts anything left as a leak). */
static void **tracked;
static size_t ntracked;

static void *track(void *p) {
  tracked = realloc(tracked, (ntracked + 1) * sizeof *tracked);
  if (!tracked)
    die("out of memory");
  tracked[ntracked++] = p;
  return p;
}

static void track_free_all(void) {
  size_t i;
  for (i = 0; i < ntracked; i++)
    free(tracked[i]);
  ntracked = 0;
}

static amqp_table_t table_from_json(json_t *o) {
  amqp_table_t t;
  const char *k;
  json_t *v;
  int i = 0;
  t.num_entries = (int)json_object_size(o);
  t.entries = calloc((size_t)t.num_entries + 1, sizeof *t.entries);
  if (!t.entries)
    die("out of memory");
  track(t.entries);
  json_object_foreach(o, k, v) {
    t.entries[i].key = amqp_cstring_bytes(k);
    field_from_json(v, &t.entries[i].value);
    i++;
  }
  return t;
}

static void field_from_json(json_t *v, amqp_field_value_t *f) {
  memset(f, 0, sizeof *f);
  if (json_is_string(v)) {
    f->kind = AMQP_FIELD_KIND_UTF8;
    f->value.bytes.bytes = (void *)json_string_value(v);
    f->value.bytes.len = json_string_length(v);
  } else if (json_is_integer(v)) {
    f->kind = AMQP_FIELD_KIND_I64;
    f->value.i64 = (int64_t)json_integer_value(v);
  } else if (json_is_real(v)) {
    f->kind = AMQP_FIELD_KIND_F64;
    f->value.f64 = json_real_value(v);
  } else if (json_is_boolean(v)) {
    f->kind = AMQP_FIELD_KIND_BOOLEAN;
    f->value.boolean = json_is_true(v);
  } else if (json_is_null(v)) {
    f->kind = AMQP_FIELD_KIND_VOID;
  } else if (json_is_array(v)) {
    size_t i;
    f->kind = AMQP_FIELD_KIND_ARRAY;
    f->value.array.num_entries = (int)json_array_size(v);
    f->value.array.entries = calloc(json_array_size(v) + 1, sizeof(amqp_field_value_t));
    if (!f->value.array.entries)
      die("out of memory");
    track(f->value.array.entries);
    for (i = 0; i < json_array_size(v); i++)
      field_from_json(json_array_get(v, i), &f->value.array.entries[i]);
  } else if (json_is_object(v) && json_object_get(v, "$hex")) {
    f->kind = AMQP_FIELD_KIND_BYTES;
    f->value.bytes = hex_bytes(json_string_value(json_object_get(v, "$hex")));
    track(f->value.bytes.bytes);
  } else if (json_is_object(v) && json_object_get(v, "$str_hex")) {
    f->kind = AMQP_FIELD_KIND_UTF8;
    f->value.bytes = hex_bytes(json_string_value(json_object_get(v, "$str_hex")));
    track(f->value.bytes.bytes);
  } else if (json_is_object(v)) {
    f->kind = AMQP_FIELD_KIND_TABLE;
    f->value.table = table_from_json(v);
  } else {
    die("unsupported header value");
  }
}

static const char *jstr_opt(json_t *spec, const char *k) {
  json_t *v = json_object_get(spec, k);
  if (v && !json_is_string(v))
    die("send: '%s' must be a string", k);
  return v ? json_string_value(v) : NULL;
}

/* Read frames for up to `wait` (NULL: only what is there) and mark the
 * confirmed publish tags. */
static void read_confirms(unsigned char *acked, uint64_t max, struct timeval *wait) {
  for (;;) {
    amqp_frame_t frame;
    struct timeval zero = {0, 0};
    int rc = amqp_simple_wait_frame_noblock(conn, &frame, wait ? wait : &zero);
    if (rc == AMQP_STATUS_TIMEOUT)
      return;
    if (rc != AMQP_STATUS_OK)
      die("send: %s", amqp_error_string2(rc));
    if (frame.frame_type != AMQP_FRAME_METHOD)
      continue;
    switch (frame.payload.method.id) {
    case AMQP_BASIC_ACK_METHOD: {
      amqp_basic_ack_t *a = frame.payload.method.decoded;
      uint64_t t;
      if (a->multiple) {
        for (t = 1; t <= a->delivery_tag && t <= max; t++)
          acked[t] = 1;
      } else if (a->delivery_tag <= max) {
        acked[a->delivery_tag] = 1;
      }
      if (wait)
        return;
      break;
    }
    case AMQP_BASIC_NACK_METHOD:
      die("send: the broker nacked a message");
    case AMQP_CHANNEL_CLOSE_METHOD: {
      amqp_channel_close_t *m = frame.payload.method.decoded;
      die("send: channel closed by broker: %u %.*s", m->reply_code,
          (int)m->reply_text.len, (char *)m->reply_text.bytes);
    }
    case AMQP_CONNECTION_CLOSE_METHOD: {
      amqp_connection_close_t *m = frame.payload.method.decoded;
      die("send: connection closed by broker: %u %.*s", m->reply_code,
          (int)m->reply_text.len, (char *)m->reply_text.bytes);
    }
    default:
      break;
    }
  }
}

static void cmd_send(const char *json_text) {
  json_error_t err;
  json_t *spec = json_loads(json_text, JSON_ALLOW_NUL, &err);
  const char *exchange, *key, *s;
  amqp_bytes_t body_fixed = {0, NULL};
  long count = 1, n;
  json_t *v;
  unsigned char *acked;
  uint64_t i;

  if (!spec || !json_is_object(spec))
    die("send: bad JSON: %s", spec ? "not an object" : err.text);
  exchange = jstr_opt(spec, "exchange");
  key = jstr_opt(spec, "key");
  if (!exchange || !key)
    die("send: 'exchange' and 'key' are required");
  if ((v = json_object_get(spec, "count")))
    count = (long)json_integer_value(v);
  if (count < 1)
    die("send: bad count");
  if ((s = jstr_opt(spec, "body_hex")))
    body_fixed = hex_bytes(s);
  else if ((v = json_object_get(spec, "body_size"))) {
    size_t sz = (size_t)json_integer_value(v), k;
    body_fixed.len = sz;
    body_fixed.bytes = malloc(sz ? sz : 1);
    if (!body_fixed.bytes)
      die("out of memory");
    for (k = 0; k < sz; k++)
      ((char *)body_fixed.bytes)[k] = (char)('a' + k % 26);
  }

  acked = calloc((size_t)count + 1, 1);
  if (!acked)
    die("out of memory");
  amqp_confirm_select(conn, channel);
  check_reply(amqp_get_rpc_reply(conn), "confirm.select");

  for (n = 0; n < count; n++) {
    amqp_basic_properties_t props;
    char *k = subst(key, n), *body_s = NULL, *mid = NULL, *cid = NULL;
    amqp_bytes_t body;
    int rc;

    memset(&props, 0, sizeof props);
    v = json_object_get(spec, "persistent");
    if (!v || json_is_true(v)) {
      props._flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
      props.delivery_mode = 2;
    }
    v = json_object_get(spec, "timestamp");
    if (!v || json_is_integer(v)) {
      props._flags |= AMQP_BASIC_TIMESTAMP_FLAG;
      props.timestamp = v ? (uint64_t)json_integer_value(v) : (uint64_t)time(NULL);
    }
    props._flags |= AMQP_BASIC_APP_ID_FLAG;
    props.app_id = amqp_cstring_bytes("amqptool");
    if ((s = jstr_opt(spec, "message_id"))) {
      mid = subst(s, n);
      props._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
      props.message_id = amqp_cstring_bytes(mid);
    } else if ((s = jstr_opt(spec, "message_id_hex"))) {
      props._flags |= AMQP_BASIC_MESSAGE_ID_FLAG;
      props.message_id = hex_bytes(s);
      track(props.message_id.bytes);
    }
    if ((s = jstr_opt(spec, "correlation_id"))) {
      cid = subst(s, n);
      props._flags |= AMQP_BASIC_CORRELATION_ID_FLAG;
      props.correlation_id = amqp_cstring_bytes(cid);
    }
    if ((s = jstr_opt(spec, "reply_to"))) {
      props._flags |= AMQP_BASIC_REPLY_TO_FLAG;
      props.reply_to = amqp_cstring_bytes(s);
    }
    if ((s = jstr_opt(spec, "type"))) {
      props._flags |= AMQP_BASIC_TYPE_FLAG;
      props.type = amqp_cstring_bytes(s);
    }
    if ((s = jstr_opt(spec, "expiration"))) {
      props._flags |= AMQP_BASIC_EXPIRATION_FLAG;
      props.expiration = amqp_cstring_bytes(s);
    }
    if ((s = jstr_opt(spec, "content_type"))) {
      props._flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
      props.content_type = amqp_cstring_bytes(s);
    } else if ((s = jstr_opt(spec, "content_type_hex"))) {
      props._flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
      props.content_type = hex_bytes(s);
      track(props.content_type.bytes);
    }
    if ((v = json_object_get(spec, "headers"))) {
      if (!json_is_object(v))
        die("send: 'headers' must be an object");
      props._flags |= AMQP_BASIC_HEADERS_FLAG;
      props.headers = table_from_json(v);
    }
    if (body_fixed.bytes) {
      body = body_fixed;
    } else {
      body_s = subst((s = jstr_opt(spec, "body")) ? s : "", n);
      body = amqp_cstring_bytes(body_s);
    }
    rc = amqp_basic_publish(conn, channel, amqp_cstring_bytes(exchange_name(exchange)),
                            amqp_cstring_bytes(k), 0, 0, &props, body);
    if (rc != AMQP_STATUS_OK)
      die("basic.publish: %s", amqp_error_string2(rc));
    track_free_all();
    free(k);
    free(body_s);
    free(mid);
    free(cid);
    if (n % 64 == 63)
      read_confirms(acked, (uint64_t)count, NULL);
  }
  for (i = 1; i <= (uint64_t)count; i++) {
    while (!acked[i]) {
      struct timeval tv = {30, 0};
      struct timeval t0, t1;
      gettimeofday(&t0, NULL);
      read_confirms(acked, (uint64_t)count, &tv);
      gettimeofday(&t1, NULL);
      if (!acked[i] && t1.tv_sec - t0.tv_sec >= 30)
        die("send: no confirm for message %" PRIu64 " within 30 s", i);
    }
  }
  free(body_fixed.bytes);
  free(tracked);
  printf("%ld\n", count);
  free(acked);
  json_decref(spec);
}

static long parse_long(const char *s, const char *what) {
  char *end;
  errno = 0;
  long v = strtol(s, &end, 10);
  if (errno || end == s || *end || v < 0) {
    fprintf(stderr, "%s: bad %s '%s'\n", prog, what, s);
    usage();
  }
  return v;
}

static double parse_double(const char *s, const char *what) {
  char *end;
  errno = 0;
  double v = strtod(s, &end);
  if (errno || end == s || *end || v < 0) {
    fprintf(stderr, "%s: bad %s '%s'\n", prog, what, s);
    usage();
  }
  return v;
}

int main(int argc, char **argv) {
  if (argc < 3)
    usage();
  const char *url = argv[1], *cmd = argv[2];
  char **a = argv + 3;
  int n = argc - 3;

  if (!strcmp(cmd, "ping")) {
    if (n != 0) usage();
  } else if (!strcmp(cmd, "declare")) {
    if (n < 1) usage();
  } else if (!strcmp(cmd, "consume")) {
    if (n != 3) usage();
  } else if (!strcmp(cmd, "count") || !strcmp(cmd, "purge") || !strcmp(cmd, "delete") ||
             !strcmp(cmd, "xdelete")) {
    if (n != 1) usage();
  } else if (!strcmp(cmd, "publish")) {
    if (n != 3 && n != 4) usage();
  } else if (!strcmp(cmd, "send")) {
    if (n != 1) usage();
  } else {
    fprintf(stderr, "%s: unknown command '%s'\n", prog, cmd);
    usage();
  }

  long count = 0;
  double timeout = 0;
  if (!strcmp(cmd, "consume")) {
    count = parse_long(a[1], "COUNT");
    timeout = parse_double(a[2], "TIMEOUT_SECONDS");
  }

  connect_broker(url);
  if (!strcmp(cmd, "declare"))
    cmd_declare(a[0], n - 1, a + 1);
  else if (!strcmp(cmd, "consume"))
    cmd_consume(a[0], count, timeout);
  else if (!strcmp(cmd, "count"))
    cmd_count(a[0]);
  else if (!strcmp(cmd, "purge"))
    cmd_purge(a[0]);
  else if (!strcmp(cmd, "delete"))
    cmd_delete(a[0]);
  else if (!strcmp(cmd, "xdelete"))
    cmd_xdelete(a[0]);
  else if (!strcmp(cmd, "publish"))
    cmd_publish(a[0], a[1], a[2], n == 4 ? a[3] : NULL);
  else if (!strcmp(cmd, "send"))
    cmd_send(a[0]);
  disconnect_broker();
  return 0;
}
