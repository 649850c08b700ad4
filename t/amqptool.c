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
 *   amqptool URL publish EXCHANGE KEY BODY [MESSAGE_ID]
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

#if defined(HAVE_RABBITMQ_C_AMQP_H)
#include <rabbitmq-c/amqp.h>
#include <rabbitmq-c/tcp_socket.h>
#else
#include <amqp.h>
#include <amqp_tcp_socket.h>
#endif
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
          "       %s URL publish EXCHANGE KEY BODY [MESSAGE_ID]\n",
          prog, prog, prog, prog, prog, prog, prog);
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
  } else if (!strcmp(cmd, "count") || !strcmp(cmd, "purge") || !strcmp(cmd, "delete")) {
    if (n != 1) usage();
  } else if (!strcmp(cmd, "publish")) {
    if (n != 3 && n != 4) usage();
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
  else if (!strcmp(cmd, "publish"))
    cmd_publish(a[0], a[1], a[2], n == 4 ? a[3] : NULL);
  disconnect_broker();
  return 0;
}
