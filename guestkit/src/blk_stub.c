#include "gk.h"
void app_blk(void) { usage_error("blk: not implemented yet"); }
