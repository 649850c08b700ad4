// Node.js amqplib client of t/integration/frontdoor_node.py: the front door
// seen by a real Node service's library. One JSON object a line on stdout.
//
//   node frontdoor_node.js publish URL N PREFIX PHASES
//       A confirm channel (createConfirmChannel) publishes N persistent
//       messages, message_id PREFIX-i, to exchange "events" with routing
//       key node.i, in PHASES equal runs. Between runs it prints
//       {"phase": k, "confirmed": c} and waits for a line on stdin, so that
//       the test can stop or start the broker between them on one open
//       connection. Each confirm prints {"confirmed": id} (or
//       {"nacked": id}); the end prints {"done": true}.
//
//   node frontdoor_node.js consume URL QUEUE N PREFETCH
//       channel.prefetch(PREFETCH), consume QUEUE, ack each message 20 ms
//       after it arrived (so that the prefetch limit can be seen), until N
//       arrived: {"got": [ids], "max_unacked": k}. A basic.consume refused
//       with a channel error prints {"refused": code, "text": ...} and
//       exits 0: the caller decides what a refusal means.
//
// amqplib is found through NODE_PATH (set by the test).
'use strict';

const amqp = require('amqplib');
const readline = require('readline');

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

// Lines of stdin, one promise per line asked for.
function lineReader() {
  const rl = readline.createInterface({ input: process.stdin });
  const waiting = [];
  const ready = [];
  rl.on('line', (line) => {
    if (waiting.length) waiting.shift()(line);
    else ready.push(line);
  });
  return () => (ready.length ? Promise.resolve(ready.shift())
    : new Promise((resolve) => waiting.push(resolve)));
}

function publishOne(ch, prefix, i) {
  const id = `${prefix}-${i}`;
  const body = Buffer.from(JSON.stringify({ n: i }));
  return new Promise((resolve) => {
    ch.publish('events', `node.${i}`, body,
      { persistent: true, messageId: id, contentType: 'application/json' },
      (err) => {
        out(err ? { nacked: id } : { confirmed: id });
        resolve(!err);
      });
  });
}

async function publish(url, n, prefix, phases) {
  const conn = await amqp.connect(url);
  const ch = await conn.createConfirmChannel();
  const nextLine = lineReader();
  const per = Math.ceil(n / phases);
  let confirmed = 0;
  for (let k = 0; k < phases; k++) {
    const sent = [];
    for (let i = k * per; i < Math.min(n, (k + 1) * per); i++) {
      sent.push(publishOne(ch, prefix, i));
    }
    // Every confirm of this run, before the test changes the broker.
    confirmed += (await Promise.all(sent)).filter(Boolean).length;
    await ch.waitForConfirms();
    if (k + 1 < phases) {
      out({ phase: k + 1, confirmed });
      await nextLine();
    }
  }
  out({ done: true, confirmed });
  await ch.close();
  await conn.close();
}

async function consume(url, queue, n, prefetch) {
  const conn = await amqp.connect(url);
  const ch = await conn.createChannel();
  let refused = null;
  // A channel error arrives both as the rejected RPC and as this event.
  ch.on('error', (err) => { refused = refused || err; });
  conn.on('error', () => {});
  await ch.prefetch(prefetch);
  const got = [];
  let unacked = 0;
  let maxUnacked = 0;
  const finished = new Promise((resolve) => {
    ch.consume(queue, (msg) => {
      if (msg === null) return;	// cancelled by the server
      got.push(msg.properties.messageId);
      unacked += 1;
      maxUnacked = Math.max(maxUnacked, unacked);
      setTimeout(() => {
        ch.ack(msg);
        unacked -= 1;
        if (got.length >= n && unacked === 0) resolve();
      }, 20);
    }).catch((err) => { refused = refused || err; resolve(); });
  });
  await finished;
  if (refused) {
    out({ refused: refused.code || 0, text: String(refused.message) });
    await conn.close().catch(() => {});
    return;
  }
  out({ got, max_unacked: maxUnacked });
  await ch.close();
  await conn.close();
}

async function main() {
  const [mode, url, ...rest] = process.argv.slice(2);
  if (mode === 'publish') {
    await publish(url, Number(rest[0]), rest[1], Number(rest[2] || 1));
  } else if (mode === 'consume') {
    await consume(url, rest[0], Number(rest[1]), Number(rest[2]));
  } else {
    throw new Error(`unknown mode ${mode}`);
  }
}

main().then(() => process.exit(0), (err) => {
  process.stderr.write(`frontdoor_node: ${err && err.stack ? err.stack : err}\n`);
  process.exit(1);
});
