-- wrk script for bench/server_load.py: every request is one device's own request.
--
-- The file named by $DIFFCAST_BENCH_REQUESTS holds one request per line, three
-- tab-separated fields: the path, the device's bearer credential and an If-None-Match
-- value ("-" for none). The requests are pre-formatted once per thread and sent in a
-- cycle, each thread starting at a different place; done() prints one JSON line that
-- starts with "WRK_JSON ".

local templates = {}
local counter = 0

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end

function init(args)
  local name = assert(os.getenv("DIFFCAST_BENCH_REQUESTS"), "DIFFCAST_BENCH_REQUESTS is not set")
  local file = assert(io.open(name, "r"))
  for line in file:lines() do
    local path, token, etag = line:match("^(%S+)\t(%S+)\t(%S+)$")
    assert(path, "bad request line: " .. line)
    local headers = {}
    if token ~= "-" then
      headers["Authorization"] = "Bearer " .. token
    end
    if etag ~= "-" then
      headers["If-None-Match"] = etag
    end
    templates[#templates + 1] = wrk.format("GET", path, headers)
  end
  file:close()
  index = (id * 7919) % #templates
end

function request()
  index = index % #templates + 1
  return templates[index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"latency_us": {"mean": %.1f, "max": %d, "p50": %d, "p90": %d, "p99": %d, "p999": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)
  ))
end
