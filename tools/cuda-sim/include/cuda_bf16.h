// The CPU stand-in's cuda_bf16.h: the built-ins header already defines __nv_bfloat16.
#pragma once
#include "mood_sim.h"
