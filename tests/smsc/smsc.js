// The SMSC the integration tests talk to: node-smpp's server (npm `smpp`, written by others),
// told by SMSC_CONFIG (JSON) how to behave, reporting what it saw as JSON lines on stdout.
//
// SMSC_CONFIG fields (all optional):
//   port               TCP port on 127.0.0.1 (0: any; the first line printed is `listening <port>`)
//   system_id, password  the one account it binds (else ESME_RBINDFAIL)
//   response_delay_ms  how long each submit_sm waits for its submit_sm_resp
//   reject_prefix      destinations starting with it get ESME_RINVDSTADR
//   throttle_every     every Nth submit_sm (1st, N+1th, …) gets ESME_RTHROTTLED
//   id_format          "decimal" (default) or "hex" (upper-case) message ids
//   silent_after       after this many submit_sm in all, the session that got the last one
//                      stops answering anything (it still reads, and gets no more receipts or
//                      MOs); later sessions answer again
//   receipts           absent: no receipts; "text" or "tlv": every accepted submit_sm with
//                      `registered_delivery & 1` gets a delivery receipt, a deliver_sm (esm_class
//                      0x04) from its destination (ton/npi 1/1) to its source. "text": the
//                      short_message is `id:… sub:001 dlvrd:001 submit date:YYMMDDhhmm done
//                      date:YYMMDDhhmm stat:DELIVRD err:000 text:<its first 20 chars>` (UTC);
//                      "tlv": an empty short_message and the TLVs receipted_message_id,
//                      message_state (2 delivered, 5 undeliverable) and, when undelivered,
//                      network_error_code (type 3, error 1)
//   receipt_delay_ms   how long after the submit_sm_resp its receipt goes (0, the default: at
//                      once, in the same tick, so it can come before the ESME stored the id)
//   receipt_id_format  "decimal" or "hex": how receipts write the id (default: id_format); the
//                      number is the submit's (submit_sm_resp `1F`, receipt `31`)
//   receipt_id_pad     with a decimal receipt id, left-pad it with zeros to this width (0)
//   undeliv_prefix     destinations starting with it are accepted, then get an undelivered
//                      receipt (`dlvrd:000 … stat:UNDELIV err:001`, message_state 5)
//   receipts_elsewhere send each receipt on a bound session other than the one that took the
//                      submit when there is one (round robin), as for an account with many binds
//   quiet              print no `submit` and `receipt` events (benchmarks)
//
// Receipts and MOs are not lost: when a deliver_sm's response has a non-zero command_status, or
// none comes in 5 s, or its session closes first, the same deliver_sm goes again 500 ms later on
// any bound session (round robin; up to 50 tries). With no session bound, it waits for a bind.
//
// Lines read on stdin (JSON): {"mo": {"from": "+49151…", "to": "Shop", "text": "STOP"}} sends a
// mobile-originated deliver_sm (esm_class 0) from `from` without its `+` (ton/npi 1/1) to `to`,
// data_coding 0 (8, UCS-2, when the text is not all GSM 03.38), on the most recently bound
// session still open (when none is, on the next to bind).
//
// Lines printed: {"event": "bind", "system_id", "ok"}, {"event": "submit", "session",
// "destination", "source", "source_ton", "source_npi", "data_coding", "esm_class",
// "registered_delivery", "udh" (hex or null), "text", "status", "message_id", "in_flight",
// "at" (when it came, milliseconds since the epoch)},
// {"event": "receipt", "session", "message_id" (as in the receipt), "stat" ("DELIVRD" or
// "UNDELIV"), "status" (of its deliver_sm_resp), "try" (1, 2, …)} for each response to a
// receipt, {"event": "mo", "session", "from", "to", "text", "status", "try"} for each response to
// an MO, and {"event": "unbind", "session"}.
'use strict';

const readline = require('readline');
const smpp = require('smpp');

const config = JSON.parse(process.env.SMSC_CONFIG || '{}');
const delay = config.response_delay_ms || 0;
const receiptDelay = config.receipt_delay_ms || 0;
const receiptIdFormat = config.receipt_id_format || config.id_format || 'decimal';
const ANSWER_TIMEOUT_MS = 5000;
const RETRY_AFTER_MS = 500;
const MAX_TRIES = 50;
let submits = 0;
let nextId = 1;
let sessions = 0;
let silenced = false;
// The bound sessions, oldest bind first: {number, session, silent, outstanding}, where
// outstanding maps a deliver_sm's sequence_number to {job, timer}.
const bound = [];
// Deliveries waiting for a session to bind.
const waiting = [];
let roundRobin = 0;

function emit(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

// The UDH as it came, its length octet first (node-smpp hands over its elements).
function rawUdh(elements) {
  if (!elements || !elements.length) {
    return null;
  }
  const body = Buffer.concat(elements);
  return Buffer.concat([Buffer.from([body.length]), body]).toString('hex');
}

function formatId(n, format, pad) {
  return format === 'hex' ? n.toString(16).toUpperCase() : String(n).padStart(pad || 0, '0');
}

// YYMMDDhhmm (UTC).
function receiptDate(date) {
  return date.toISOString().replace(/^\d\d(\d\d)-(\d\d)-(\d\d)T(\d\d):(\d\d).*$/, '$1$2$3$4$5');
}

function usable(record) {
  return !record.silent && record.session.socket.writable;
}

// The next usable bound session (round robin), other than `not` when there is one.
function pick(not) {
  const open = bound.filter(usable);
  const others = open.filter(function (record) {
    return record !== not;
  });
  const candidates = others.length ? others : open;
  if (!candidates.length) {
    return null;
  }
  roundRobin += 1;
  return candidates[roundRobin % candidates.length];
}

// The most recently bound usable session.
function latest() {
  const open = bound.filter(usable);
  return open.length ? open[open.length - 1] : null;
}

function forget(record) {
  const at = bound.indexOf(record);
  if (at >= 0) {
    bound.splice(at, 1);
  }
}

// Sends a job ({options (of the deliver_sm), tries, report(number, status, try)}) on `record`,
// or when that is null, queues it for the next bind.
function deliver(job, record) {
  if (!record) {
    waiting.push(job);
    return;
  }
  job.tries += 1;
  const pdu = new smpp.PDU('deliver_sm', Object.assign({}, job.options));
  const sent = record.session.send(pdu, function (resp) {
    const entry = record.outstanding.get(pdu.sequence_number);
    if (!entry || entry.job !== job) {
      return;
    }
    clearTimeout(entry.timer);
    record.outstanding.delete(pdu.sequence_number);
    const status = resp.command_status;
    job.report(record.number, status, job.tries);
    if (resp.command !== 'deliver_sm_resp' || status !== smpp.ESME_ROK) {
      retry(job);
    }
  });
  if (!sent) {
    retry(job);
    return;
  }
  const timer = setTimeout(function () {
    record.outstanding.delete(pdu.sequence_number);
    delete record.session._callbacks[pdu.sequence_number];
    retry(job);
  }, ANSWER_TIMEOUT_MS);
  record.outstanding.set(pdu.sequence_number, { job: job, timer: timer });
}

function retry(job) {
  if (job.tries >= MAX_TRIES) {
    process.stderr.write('smsc.js: gave up on a deliver_sm after ' + job.tries + ' tries\n');
    return;
  }
  setTimeout(function () {
    deliver(job, pick(null));
  }, RETRY_AFTER_MS);
}

function sendReceipt(record, submit, n, destination, submittedAt) {
  const id = formatId(n, receiptIdFormat, config.receipt_id_pad);
  const delivered = !(config.undeliv_prefix && destination.startsWith(config.undeliv_prefix));
  const stat = delivered ? 'DELIVRD' : 'UNDELIV';
  const options = {
    source_addr_ton: 1,
    source_addr_npi: 1,
    source_addr: destination,
    dest_addr_ton: submit.source_addr_ton,
    dest_addr_npi: submit.source_addr_npi,
    destination_addr: String(submit.source_addr),
    esm_class: smpp.ESM_CLASS.MC_DELIVERY_RECEIPT,
    data_coding: 0,
    short_message: '',
  };
  if (config.receipts === 'tlv') {
    options.receipted_message_id = id;
    options.message_state = delivered ? 2 : 5;
    if (!delivered) {
      options.network_error_code = Buffer.from([3, 0, 1]);
    }
  } else {
    options.short_message = 'id:' + id + ' sub:001 dlvrd:' + (delivered ? '001' : '000') +
      ' submit date:' + receiptDate(submittedAt) + ' done date:' + receiptDate(new Date()) +
      ' stat:' + stat + ' err:' + (delivered ? '000' : '001') +
      ' text:' + Array.from(submit.text).slice(0, 20).join('');
  }
  const job = {
    options: options,
    tries: 0,
    report: function (number, status, tries) {
      if (!config.quiet) {
        emit({
          event: 'receipt',
          session: number,
          message_id: id,
          stat: stat,
          status: status,
          try: tries,
        });
      }
    },
  };
  let target = usable(record) && bound.includes(record) ? record : pick(null);
  if (config.receipts_elsewhere) {
    target = pick(record);
  }
  deliver(job, target);
}

function sendMo(mo) {
  const text = String(mo.text || '');
  const from = String(mo.from || '');
  const to = String(mo.to || '');
  const job = {
    options: {
      source_addr_ton: 1,
      source_addr_npi: 1,
      source_addr: from.replace(/^\+/, ''),
      destination_addr: to,
      esm_class: 0,
      data_coding: smpp.encodings.ASCII.match(text) ? 0 : 8,
      short_message: text,
    },
    tries: 0,
    report: function (number, status, tries) {
      emit({
        event: 'mo',
        session: number,
        from: from,
        to: to,
        text: text,
        status: status,
        try: tries,
      });
    },
  };
  deliver(job, latest());
}

const server = smpp.createServer(function (session) {
  const number = ++sessions;
  const record = { number: number, session: session, silent: false, outstanding: new Map() };
  let inFlight = 0;
  session.on('error', function () {});
  session.on('close', function () {
    forget(record);
    const lost = Array.from(record.outstanding.values());
    record.outstanding.clear();
    lost.forEach(function (entry) {
      clearTimeout(entry.timer);
      retry(entry.job);
    });
  });
  session.on('bind_transceiver', function (pdu) {
    const ok = (!config.system_id || pdu.system_id === config.system_id) &&
      (!config.password || pdu.password === config.password);
    emit({ event: 'bind', session: number, system_id: pdu.system_id, ok: ok });
    if (!ok) {
      session.send(pdu.response({ command_status: smpp.ESME_RBINDFAIL }));
      session.close();
      return;
    }
    session.send(pdu.response({ system_id: 'test-smsc' }));
    if (!bound.includes(record)) {
      bound.push(record);
    }
    waiting.splice(0).forEach(function (job) {
      deliver(job, record);
    });
  });
  session.on('submit_sm', function (pdu) {
    if (record.silent) {
      emit({ event: 'ignored', session: number });
      return;
    }
    const submittedAt = new Date();
    submits += 1;
    inFlight += 1;
    let status = smpp.ESME_ROK;
    const destination = String(pdu.destination_addr);
    if (config.reject_prefix && destination.startsWith(config.reject_prefix)) {
      status = smpp.ESME_RINVDSTADR;
    } else if (config.throttle_every && (submits - 1) % config.throttle_every === 0) {
      status = smpp.ESME_RTHROTTLED;
    }
    const message = pdu.short_message || {};
    const n = status === smpp.ESME_ROK ? nextId++ : 0;
    const id = n ? formatId(n, config.id_format) : '';
    const text = typeof message.message === 'string'
      ? message.message
      : String(message.message || '');
    if (!config.quiet) {
      emit({
        event: 'submit',
        session: number,
        destination: destination,
        source: String(pdu.source_addr),
        source_ton: pdu.source_addr_ton,
        source_npi: pdu.source_addr_npi,
        data_coding: pdu.data_coding,
        esm_class: pdu.esm_class,
        registered_delivery: pdu.registered_delivery,
        udh: rawUdh(message.udh),
        text: text,
        status: status,
        message_id: id,
        in_flight: inFlight,
        at: submittedAt.getTime(),
      });
    }
    if (config.silent_after && !silenced && submits >= config.silent_after) {
      silenced = true;
      record.silent = true;
      emit({ event: 'silent', session: number });
    }
    const submit = {
      source_addr: pdu.source_addr,
      source_addr_ton: pdu.source_addr_ton,
      source_addr_npi: pdu.source_addr_npi,
      text: text,
    };
    setTimeout(function () {
      if (record.silent) {
        return;
      }
      inFlight -= 1;
      session.send(pdu.response(status === smpp.ESME_ROK
        ? { message_id: id }
        : { command_status: status }));
      if (status !== smpp.ESME_ROK || !config.receipts || !(pdu.registered_delivery & 1)) {
        return;
      }
      if (receiptDelay) {
        setTimeout(function () {
          sendReceipt(record, submit, n, destination, submittedAt);
        }, receiptDelay);
      } else {
        sendReceipt(record, submit, n, destination, submittedAt);
      }
    }, delay);
  });
  session.on('enquire_link', function (pdu) {
    if (!record.silent) {
      session.send(pdu.response());
    }
  });
  session.on('deliver_sm_resp', function () {});
  session.on('unbind', function (pdu) {
    emit({ event: 'unbind', session: number });
    forget(record);
    session.send(pdu.response());
    session.close();
  });
});

readline.createInterface({ input: process.stdin }).on('line', function (line) {
  if (!line.trim()) {
    return;
  }
  let command;
  try {
    command = JSON.parse(line);
  } catch (e) {
    process.stderr.write('smsc.js: not JSON on stdin: ' + line + '\n');
    return;
  }
  if (command && command.mo) {
    sendMo(command.mo);
  } else {
    process.stderr.write('smsc.js: unknown command on stdin: ' + line + '\n');
  }
});

server.listen(config.port || 0, '127.0.0.1', function () {
  process.stdout.write('listening ' + server.address().port + '\n');
});
