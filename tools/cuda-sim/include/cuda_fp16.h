// The CPU stand-in's cuda_fp16.h: the built-ins header already defines __half.
#pragma once
#include "mood_sim.h"
