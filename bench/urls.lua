-- wrk script for bench/run.sh: every connection walks the same list of paths (one per line
-- in the file named by the first script argument), each wrk thread from its own offset.
-- Requests are formatted once in init, so the load generator spends its time on I/O.
local threads = 0

function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end

function init(args)
  requests = {}
  for line in io.lines(args[1]) do
    requests[#requests + 1] = wrk.format("GET", line)
  end
  counter = ((id or 0) * 499) % #requests
end

function request()
  counter = counter % #requests + 1
  return requests[counter]
end
