// router: placeholder, to be written
#pragma once
