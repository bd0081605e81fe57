#!/usr/bin/env node
// A REaaS client in Node, written from protos/reaas/v1/encoder_service.proto alone (no REaaS code): it asks
// GetEncoderInfo, then Feature and (given feature radii) F2IPerturb for a file of images, and prints one JSON
// object: {"info": EncoderInfo, "features": [[...], ...], "radii": [ImageRadius, ...]}.
//
// Images: a file of raw little-endian float32 pixels, [batch, C, H, W] in C order; batch follows from the
// file size and EncoderInfo.input_shape. Run `node client.js --help` for the flags.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = path.join(__dirname, '..', '..', 'protos', 'reaas', 'v1', 'encoder_service.proto');
const FLOAT32_BYTES = 4;
const MESSAGE_HEADROOM = 0.9; // pixels fill at most this share of max_message_bytes; the rest is framing
const UNAVAILABLE_TRIES = 4; // tries in a row that reach no live server before giving up
const USAGE = `usage: node client.js --address HOST:PORT --images FILE [options]

  --address HOST:PORT      the reaas-server (default 127.0.0.1:50051)
  --images FILE            raw little-endian float32 pixels, [batch, C, H, W]
  --feature-radii R,R,...  R_F per image (or one value for all): also call F2IPerturb
  --bound NAME             F2IPerturb bound (default: empty, the server's default_bound)
  --api-key KEY            sent as gRPC metadata x-api-key
  --timeout-s S            deadline of each call, retries included (default 60)
  --concurrency N          requests in flight at once when the images need several (default 1); the output's
                           "retried_busy" counts RESOURCE_EXHAUSTED answers that were retried after the hint
  --tls                    TLS with the system's root certificates
  --tls-ca FILE            TLS, trusting this CA (PEM)
  --tls-client-cert FILE   with --tls-client-key: a client certificate for mutual TLS (PEM)
  --tls-client-key FILE`;

function loadEncoderService() {
  // keepCase: the proto's snake_case field names; enums as their names ("FLOAT32"); int64/uint64 as numbers
  // (shapes and byte limits are far below 2^53)
  const definition = protoLoader.loadSync(PROTO, {
    keepCase: true, longs: Number, enums: String, defaults: true,
  });
  return grpc.loadPackageDefinition(definition).reaas.v1.EncoderService;
}

function channelCredentials(options) {
  const read = (name) => (options[name] ? fs.readFileSync(options[name]) : null);
  const tls = options.tls || options['tls-ca'] || options['tls-client-cert'];
  if (!tls) return grpc.credentials.createInsecure();
  return grpc.credentials.createSsl(read('tls-ca'), read('tls-client-key'), read('tls-client-cert'));
}

// The server's retry hint in ms (trailing metadata grpc-retry-pushback-ms), null when absent or negative.
function retryPushbackMs(error) {
  const values = error.metadata ? error.metadata.get('grpc-retry-pushback-ms') : [];
  const milliseconds = values.length ? Number(String(values[0])) : NaN;
  return Number.isInteger(milliseconds) && milliseconds >= 0 ? milliseconds : null;
}

// One unary call under the contract's retry rules (every reaas.v1 RPC is idempotent, so re-sending is safe):
// UNAVAILABLE -> back off 0.1 s doubling to 2 s and re-send, a few times; RESOURCE_EXHAUSTED with a pushback
// hint (server busy) -> re-send after the hint plus 0-25 % jitter; anything else, RESOURCE_EXHAUSTED without
// a hint (request too large) included, is the answer. All tries share one deadline.
const busy = { retried: 0 };  // RESOURCE_EXHAUSTED answers with a hint that were retried (reported in the output)

async function call(client, method, request, metadata, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  for (let unavailable = 0; ; ) {
    try {
      return await new Promise((resolve, reject) => {
        client[method](request, metadata, { deadline }, (error, reply) =>
          (error ? reject(error) : resolve(reply)));
      });
    } catch (error) {
      const hint = error.code === grpc.status.RESOURCE_EXHAUSTED ? retryPushbackMs(error) : null;
      let waitMs;
      if (hint !== null) {
        busy.retried += 1;
        waitMs = hint * (1 + 0.25 * Math.random());
      } else if (error.code === grpc.status.UNAVAILABLE && ++unavailable < UNAVAILABLE_TRIES) {
        const ceiling = Math.min(100 * 2 ** (unavailable - 1), 2000);
        waitMs = ceiling * (0.5 + 0.5 * Math.random());
      } else {
        throw error;
      }
      if (Date.now() + waitMs >= deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, waitMs));
    }
  }
}

// Rows of a FLOAT32 [batch, D] Tensor as arrays of numbers (each float32 value exactly).
function float32Rows(tensor) {
  const [rows, columns] = tensor.shape.map(Number);
  if (tensor.dtype !== 'FLOAT32' || tensor.raw_data.length !== rows * columns * FLOAT32_BYTES) {
    throw new Error(`expected FLOAT32 [${rows}, ${columns}] features, got ${tensor.dtype}, `
      + `${tensor.raw_data.length} bytes`);
  }
  return Array.from({ length: rows }, (_, row) =>
    Array.from({ length: columns }, (_, column) =>
      tensor.raw_data.readFloatLE((row * columns + column) * FLOAT32_BYTES)));
}

function featureRadiiFor(option, batch) {
  if (option === undefined) return null;
  const radii = option.split(',').map(Number);
  if (radii.length === 1) return new Array(batch).fill(radii[0]);
  if (radii.length !== batch) throw new Error(`${radii.length} feature radii for ${batch} images`);
  return radii;
}

async function main() {
  const { values: options } = parseArgs({
    options: {
      address: { type: 'string', default: '127.0.0.1:50051' },
      images: { type: 'string' },
      'feature-radii': { type: 'string' },
      bound: { type: 'string', default: '' },
      'api-key': { type: 'string' },
      'timeout-s': { type: 'string', default: '60' },
      concurrency: { type: 'string', default: '1' },
      tls: { type: 'boolean', default: false },
      'tls-ca': { type: 'string' },
      'tls-client-cert': { type: 'string' },
      'tls-client-key': { type: 'string' },
      help: { type: 'boolean', default: false },
    },
  });
  if (options.help || !options.images) {
    (options.help ? console.log : console.error)(USAGE);
    process.exit(options.help ? 0 : 2);
  }
  const EncoderService = loadEncoderService();
  // replies are not size-capped by the server; grpc-js would refuse any over 4 MiB by default
  const client = new EncoderService(options.address, channelCredentials(options), {
    'grpc.max_receive_message_length': -1,
  });
  const metadata = new grpc.Metadata();
  if (options['api-key']) metadata.set('x-api-key', options['api-key']);
  const timeoutMs = 1000 * Number(options['timeout-s']);
  try {
    const info = await call(client, 'GetEncoderInfo', {}, metadata, timeoutMs);
    const imageBytes = FLOAT32_BYTES * info.input_shape.reduce((product, size) => product * Number(size), 1);
    const pixels = fs.readFileSync(options.images);
    if (pixels.length === 0 || pixels.length % imageBytes !== 0) {
      throw new Error(`${options.images}: ${pixels.length} bytes is not a whole number of `
        + `${imageBytes}-byte images`);
    }
    const batch = pixels.length / imageBytes;
    const featureRadii = featureRadiiFor(options['feature-radii'], batch);
    // split as the server requires: at most max_batch_size images and max_message_bytes per request
    const byBytes = Math.floor((info.max_message_bytes * MESSAGE_HEADROOM) / imageBytes);
    const step = Math.max(1, Math.min(info.max_batch_size, byBytes));
    const starts = [];
    for (let start = 0; start < batch; start += step) starts.push(start);
    const parts = new Array(starts.length);  // [features, radii] per request, in request order
    const answer = async (index) => {
      const start = starts[index];
      const count = Math.min(step, batch - start);
      const images = {
        dtype: 'FLOAT32',
        shape: [count, ...info.input_shape],
        raw_data: pixels.subarray(start * imageBytes, (start + count) * imageBytes),
      };
      const reply = await call(client, 'Feature', { images }, metadata, timeoutMs);
      let radii = [];
      if (featureRadii) {
        const request = {
          images, feature_radii: featureRadii.slice(start, start + count), bound: options.bound,
        };
        radii = (await call(client, 'F2IPerturb', request, metadata, timeoutMs)).radii;
      }
      parts[index] = [float32Rows(reply.features), radii];
    };
    // up to --concurrency requests in flight: each worker takes the next request until none is left
    let next = 0;
    const worker = async () => { while (next < starts.length) await answer(next++); };
    const concurrency = Math.max(1, Number(options.concurrency));
    await Promise.all(Array.from({ length: Math.min(concurrency, starts.length) }, worker));
    const features = parts.flatMap(([rows]) => rows);
    const radii = parts.flatMap(([, part]) => part);
    process.stdout.write(`${JSON.stringify({
      info, features, radii: featureRadii ? radii : null, retried_busy: busy.retried,
    })}\n`);
  } finally {
    client.close();
  }
}

main().catch((error) => {
  const status = error.code !== undefined && grpc.status[error.code] ? `${grpc.status[error.code]}: ` : '';
  console.error(`${status}${error.details || error.message}`);
  process.exit(1);
});
