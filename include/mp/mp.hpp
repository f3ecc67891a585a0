#pragma once
/// \file
/// mp: Python's multiprocessing process model for C++20. This umbrella header includes every
/// public header.

#include "mp/connection.hpp"
#include "mp/context.hpp"
#include "mp/errors.hpp"
#include "mp/futures.hpp"
#include "mp/managers.hpp"
#include "mp/pool.hpp"
#include "mp/process.hpp"
#include "mp/py.hpp"
#include "mp/queue.hpp"
#include "mp/serialize.hpp"
#include "mp/shareable_list.hpp"
#include "mp/shared_memory.hpp"
#include "mp/socketserver.hpp"
#include "mp/synchronize.hpp"
#include "mp/util.hpp"
