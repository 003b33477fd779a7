'use strict';
// A Node.js client of Parley's UserService: @grpc/proto-loader reads the project's
// proto/user.proto at run time (no generated code), and every call sends a bearer token.
//
// Usage: PARLEY_USER_ADDR=host:port PARLEY_TOKEN=<jwt> node client.js <name> <email> <age>
// Prints one JSON object: the created user, the user read back, and where ListUsers found it.
// On an RPC error it prints {"error": {...}} to stderr and exits with status 1.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_PATH = path.resolve(__dirname, '..', '..', '..', 'proto', 'user.proto');
const CALL_TIMEOUT_MS = 10000;
const PAGE_SIZE = 100;
const NEXT_PAGE_TOKEN_KEY = 'x-next-page-token';

function required(name) {
  const value = (process.env[name] || '').trim();
  if (!value) {
    throw new Error(`${name} is not set`);
  }
  return value;
}

function deadline() {
  return { deadline: Date.now() + CALL_TIMEOUT_MS };
}

function unary(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, deadline(), (error, response) => {
      if (error) {
        reject(error);
      } else {
        resolve(response);
      }
    });
  });
}

// One ListUsers call: the users it streamed and its x-next-page-token trailer.
function listPage(client, request, metadata) {
  return new Promise((resolve, reject) => {
    const users = [];
    const call = client.ListUsers(request, metadata, deadline());
    call.on('data', (user) => users.push(user));
    call.on('error', reject);
    call.on('status', (status) => {
      if (status.code === grpc.status.OK) {
        const values = status.metadata.get(NEXT_PAGE_TOKEN_KEY);
        resolve({ users, nextPageToken: values.length ? String(values[0]) : null });
      }
    });
  });
}

async function findInList(client, metadata, id) {
  let pageToken = '';
  for (let pages = 1; ; pages += 1) {
    const page = await listPage(client, { page_size: PAGE_SIZE, page_token: pageToken }, metadata);
    if (page.nextPageToken === null) {
      throw new Error(`ListUsers sent no ${NEXT_PAGE_TOKEN_KEY} trailer`);
    }
    const user = page.users.find((u) => u.id === id);
    if (user || page.nextPageToken === '') {
      return { pages, user: user || null };
    }
    pageToken = page.nextPageToken;
  }
}

async function main() {
  const [name, email, age] = process.argv.slice(2);
  if (!name || !email || age === undefined) {
    throw new Error('usage: node client.js <name> <email> <age>');
  }
  const address = required('PARLEY_USER_ADDR');
  const metadata = new grpc.Metadata();
  metadata.add('authorization', `Bearer ${required('PARLEY_TOKEN')}`);

  const definition = protoLoader.loadSync(PROTO_PATH, {
    keepCase: true,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  const { user: userPackage } = grpc.loadPackageDefinition(definition);
  const client = new userPackage.UserService(address, grpc.credentials.createInsecure());
  try {
    const created = await unary(
      client,
      'CreateUser',
      { name, email, age: Number(age) },
      metadata,
    );
    const got = await unary(client, 'GetUser', { id: created.user.id }, metadata);
    const listed = await findInList(client, metadata, created.user.id);
    process.stdout.write(`${JSON.stringify({ created, got: got.user, listed })}\n`);
  } finally {
    client.close();
  }
}

main().catch((error) => {
  const report = { message: error.message };
  if (typeof error.code === 'number') {
    report.code = grpc.status[error.code];
    report.details = error.details;
  }
  process.stderr.write(`${JSON.stringify({ error: report })}\n`);
  process.exitCode = 1;
});
