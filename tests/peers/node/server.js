// A gRPC server in Node (grpc-js) answering /mesh.test.Echo/Hello with its own address "127.0.0.1:<port>"
// (what the tests' call helper checks replies against), after --delay-ms. Prints `listening 127.0.0.1:<port>`
// once serving. --port binds a given port (to restart a server where it was).
//
// On SIGTERM it stops gracefully, as grpc-js servers do in a rolling restart: tryShutdown sends GOAWAY, calls
// already received finish, then the process exits.
'use strict';
const grpc = require('@grpc/grpc-js');

function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}

const port = arg('--port', 0);
const delay = arg('--delay-ms', 0);
const raw = (b) => b;
const service = {
  Hello: {
    path: '/mesh.test.Echo/Hello',
    requestStream: false,
    responseStream: false,
    requestSerialize: raw,
    requestDeserialize: raw,
    responseSerialize: raw,
    responseDeserialize: raw,
  },
};

const server = new grpc.Server();
let reply = Buffer.alloc(0);
server.addService(service, {
  Hello: (_call, callback) => setTimeout(() => callback(null, reply), delay),
});
server.bindAsync(`127.0.0.1:${port}`, grpc.ServerCredentials.createInsecure(), (error, bound) => {
  if (error) {
    console.error(`cannot bind 127.0.0.1:${port}: ${error.message}`);
    process.exit(1);
  }
  reply = Buffer.from(`127.0.0.1:${bound}`);
  console.log(`listening 127.0.0.1:${bound}`);
});
process.on('SIGTERM', () => server.tryShutdown(() => process.exit(0)));
