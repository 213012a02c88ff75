#include "ferry_shims.h"
