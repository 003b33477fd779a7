'use strict';
// A terminal chat client of Parley's ChatService in Node.js: @grpc/proto-loader reads the
// project's proto/chat.proto at run time (no generated code).
//
// Usage: PARLEY_CHAT_ADDR=host:port PARLEY_TOKEN=<jwt> node chat.js [room]
// Each line typed is sent as a message; every message of the room is printed as
// `#<sequence> <user>: <text>`. When the connection drops (UNAVAILABLE), it reconnects and
// resumes after the last sequence it printed, so nothing is missed or printed twice, and
// resends what the server had not yet echoed back.
// End of input (Ctrl-D) ends the chat.

const crypto = require('node:crypto');
const path = require('node:path');
const readline = require('node:readline');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_PATH = path.resolve(__dirname, '..', '..', '..', 'proto', 'chat.proto');
const RECONNECT_DELAY_MS = 500;

function required(name) {
  const value = (process.env[name] || '').trim();
  if (!value) {
    console.error(`${name} is not set`);
    process.exit(2);
  }
  return value;
}

const address = required('PARLEY_CHAT_ADDR');
const token = required('PARLEY_TOKEN');
const room = process.argv[2] || '';

const definition = protoLoader.loadSync(PROTO_PATH, {
  keepCase: true,
  longs: String,
  defaults: true,
  includeDirs: [path.dirname(PROTO_PATH)],
});
const { chat } = grpc.loadPackageDefinition(definition);
const client = new chat.ChatService(address, grpc.credentials.createInsecure());

let lastSequence = null;
let call = null;
let closing = false;
let sent = 0;
const session = crypto.randomUUID();
// Messages written but not yet seen back from the server, resent after a reconnect with the
// same client message id, which the server stores and delivers once.
const unacknowledged = new Map();

function connect() {
  const metadata = new grpc.Metadata();
  metadata.set('authorization', `Bearer ${token}`);
  if (room) {
    metadata.set('x-chat-room', room);
  }
  if (lastSequence !== null) {
    metadata.set('x-chat-resume-after', lastSequence);
  }
  call = client.StreamChat(metadata);
  for (const [id, text] of unacknowledged) {
    call.write({ text, client_message_id: id });
  }
  call.on('data', (message) => {
    unacknowledged.delete(message.client_message_id);
    lastSequence = message.sequence;
    console.log(`#${message.sequence} ${message.user}: ${message.text}`);
  });
  call.on('error', (error) => {
    if (closing && error.code === grpc.status.CANCELLED) {
      return;
    }
    if (error.code === grpc.status.UNAVAILABLE && !closing) {
      console.error(`(reconnecting: ${error.details})`);
      setTimeout(connect, RECONNECT_DELAY_MS);
      return;
    }
    console.error(`${grpc.status[error.code]}: ${error.details}`);
    process.exit(1);
  });
  call.on('end', () => {
    if (closing) {
      process.exit(0);
    }
  });
}

connect();
console.error(`joined ${room || 'general'} at ${address}`);

const input = readline.createInterface({ input: process.stdin, terminal: false });
input.on('line', (line) => {
  const text = line.trim();
  if (text) {
    sent += 1;
    const id = `${session}-${sent}`;
    unacknowledged.set(id, text);
    call.write({ user: '', text, client_message_id: id });
  }
});
input.on('close', () => {
  closing = true;
  call.cancel();
  process.exit(0);
});
