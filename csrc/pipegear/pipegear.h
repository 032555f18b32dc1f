#pragma once
/// The public C++ API of pipegear for one process.
///
///   #include <pipegear/pipegear.h>
///   auto pipe = pipegear::GPipe(model, pipegear::GPipeOptions({2, 2}).chunks(8));
///
/// The distributed pipeline (one stage per process over c10d) is included
/// on its own, since it brings torch's c10d headers:
///
///   #include <pipegear/distributed/pipeline.h>

#include <pipegear/checkpoint.h>
#include <pipegear/engine.h>
#include <pipegear/errors.h>
#include <pipegear/gpipe.h>
#include <pipegear/microbatch.h>
#include <pipegear/nn/deferred_batch_norm.h>
#include <pipegear/partition.h>
#include <pipegear/profile.h>
#include <pipegear/random.h>
#include <pipegear/schedule.h>
#include <pipegear/skip.h>
#include <pipegear/stage.h>
#include <pipegear/trace.h>
#include <pipegear/version.h>
