// moe_scan: placeholder, to be written
#pragma once
