// The SMSC's own ceiling, measured without smsbatch: node-smpp's client binds `binds`
// transceiver sessions to the SMSC at 127.0.0.1:`port`, submits `count` short GSM-7 messages
// asking for receipts, at most `window` unanswered per session, answers every deliver_sm at
// once, and prints one JSON line when the last receipt came:
//   {"submits": n, "submit_seconds": s, "receipts": n, "receipt_seconds": s}
// (both times from the first submit). Used by `bench --provider smpp`.
//
// BLAST_CONFIG (JSON): port, system_id, password, count, window (default 10), binds (default 1).
'use strict';

const smpp = require('smpp');

const config = JSON.parse(process.env.BLAST_CONFIG || '{}');
const count = config.count || 1000;
const window = config.window || 10;
const binds = config.binds || 1;

let next = 0;
let answered = 0;
let receipts = 0;
let started = 0;
let submitSeconds = 0;

function seconds() {
  return Number(process.hrtime.bigint() - BigInt(started)) / 1e9;
}

function done() {
  process.stdout.write(JSON.stringify({
    submits: answered,
    submit_seconds: submitSeconds,
    receipts: receipts,
    receipt_seconds: seconds(),
  }) + '\n');
  process.exit(0);
}

function fill(session, state) {
  while (state.inFlight < window && next < count) {
    const n = next++;
    state.inFlight += 1;
    session.submit_sm({
      source_addr: 'Blast',
      source_addr_ton: 5,
      destination_addr: String(8613900000000 + n),
      destination_addr_ton: 1,
      destination_addr_npi: 1,
      registered_delivery: 1,
      short_message: 'Your code is ' + n,
    }, function (pdu) {
      state.inFlight -= 1;
      if (pdu.command_status !== 0) {
        process.stderr.write('blast.js: submit refused with status ' + pdu.command_status + '\n');
        process.exit(1);
      }
      answered += 1;
      if (answered === count) {
        submitSeconds = seconds();
      }
      fill(session, state);
    });
  }
}

let ready = 0;
const sessions = [];
for (let i = 0; i < binds; i++) {
  const session = smpp.connect({ url: 'smpp://127.0.0.1:' + config.port });
  session.on('error', function (e) {
    process.stderr.write('blast.js: ' + e + '\n');
    process.exit(1);
  });
  session.on('deliver_sm', function (pdu) {
    session.send(pdu.response());
    receipts += 1;
    if (receipts === count) {
      done();
    }
  });
  session.bind_transceiver({ system_id: config.system_id, password: config.password },
    function (pdu) {
      if (pdu.command_status !== 0) {
        process.stderr.write('blast.js: bind refused with status ' + pdu.command_status + '\n');
        process.exit(1);
      }
      sessions.push(session);
      ready += 1;
      if (ready === binds) {
        started = process.hrtime.bigint();
        sessions.forEach(function (s) {
          fill(s, { inFlight: 0 });
        });
      }
    });
}
