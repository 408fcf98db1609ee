// moe_scatter: placeholder, to be written
#pragma once
