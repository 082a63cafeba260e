// The PeerJS server (npm `peer`) as a baseline: node peerjs_server.cjs PORT
const { PeerServer } = require("peer");
const port = Number(process.argv[2]);
const server = PeerServer({ port, path: "/", allow_discovery: false, concurrent_limit: 100000 }, () => {
  console.log(JSON.stringify({ listening: port }));
});
process.on("SIGTERM", () => process.exit(0));
