// The SMSC the integration tests talk to: node-smpp's server (npm `smpp`, written by others),
// told by SMSC_CONFIG (JSON) how to behave, reporting what it saw as JSON lines on stdout.
//
// SMSC_CONFIG fields (all optional):
//   port               TCP port on 127.0.0.1 (0: any; the first line printed is `listening <port>`)
//   system_id, password  the one account it binds (else ESME_RBINDFAIL)
//   response_delay_ms  how long each submit_sm waits for its submit_sm_resp
//   reject_prefix      destinations starting with it get ESME_RINVDSTADR
//   throttle_every     every Nth submit_sm (1st, N+1th, …) gets ESME_RTHROTTLED
//   id_format          "decimal" (default) or "hex" message ids
//   silent_after       after this many submit_sm in all, the session that got the last one
//                      stops answering anything (it still reads); later sessions answer again
//
// Lines printed: {"event": "bind", "system_id", "ok"}, {"event": "submit", "session",
// "destination", "source", "source_ton", "source_npi", "data_coding", "esm_class",
// "registered_delivery", "udh" (hex or null), "text", "status", "message_id", "in_flight"}, and
// {"event": "unbind", "session"}.
'use strict';

const smpp = require('smpp');

const config = JSON.parse(process.env.SMSC_CONFIG || '{}');
const delay = config.response_delay_ms || 0;
let submits = 0;
let nextId = 1;
let sessions = 0;
let silenced = false;

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

function messageId() {
  const n = nextId++;
  return config.id_format === 'hex' ? n.toString(16).toUpperCase() : String(n);
}

const server = smpp.createServer(function (session) {
  const number = ++sessions;
  let inFlight = 0;
  let silent = false;
  session.on('error', function () {});
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
  });
  session.on('submit_sm', function (pdu) {
    if (silent) {
      emit({ event: 'ignored', session: number });
      return;
    }
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
    const id = status === smpp.ESME_ROK ? messageId() : '';
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
      text: typeof message.message === 'string' ? message.message : String(message.message || ''),
      status: status,
      message_id: id,
      in_flight: inFlight,
    });
    if (config.silent_after && !silenced && submits >= config.silent_after) {
      silenced = true;
      silent = true;
      emit({ event: 'silent', session: number });
    }
    setTimeout(function () {
      if (silent) {
        return;
      }
      inFlight -= 1;
      session.send(pdu.response(status === smpp.ESME_ROK
        ? { message_id: id }
        : { command_status: status }));
    }, delay);
  });
  session.on('enquire_link', function (pdu) {
    if (!silent) {
      session.send(pdu.response());
    }
  });
  session.on('deliver_sm_resp', function () {});
  session.on('unbind', function (pdu) {
    emit({ event: 'unbind', session: number });
    session.send(pdu.response());
    session.close();
  });
});

server.listen(config.port || 0, '127.0.0.1', function () {
  process.stdout.write('listening ' + server.address().port + '\n');
});
