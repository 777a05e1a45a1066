// kinesalite's CLI binds every interface and has slow defaults; this binds loopback only.
// usage: node kinesalite-local.js PORT
// KINESALITE_ORIGINAL=1 leaves out kinesalite-fast-sequence.js (kinesalite exactly as published).
const db = require('kinesalite/db');
if (!process.env.KINESALITE_ORIGINAL) require('./kinesalite-fast-sequence.js')(db);
const kinesalite = require('kinesalite');
const port = +(process.argv[2] || 4567);
const server = kinesalite({createStreamMs: 0, deleteStreamMs: 0, updateStreamMs: 0, shardLimit: 100});
server.listen(port, '127.0.0.1', () => console.log('listening on 127.0.0.1:%d', server.address().port));
